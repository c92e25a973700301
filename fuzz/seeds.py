import gzip, bz2, lzma, struct, os
c='fuzz/corpus/'
def elf(body=b'\x90'*64, paddr=0x100000):
    eh=b'\x7fELF'+bytes([2,1,1,0])+b'\0'*8
    eh+=struct.pack('<HHIQQQIHHHHHH',2,62,1,paddr,64,0,0,64,56,1,64,0,0)
    ph=struct.pack('<IIQQQQQQ',1,7,120,paddr,paddr,len(body),len(body)+64,0x1000)
    return eh+ph+body
e=elf()
open(c+'elf_sink/one_load','wb').write(b'\x3f\x00'+e)
sz=struct.pack('<I',len(e))
for name,p in [('gzip',gzip.compress(e)),('bzip2',bz2.compress(e)+sz),('xz',lzma.compress(e,format=lzma.FORMAT_XZ,check=lzma.CHECK_CRC32)+sz),('lzma',lzma.compress(e,format=lzma.FORMAT_ALONE)+sz)]:
    open(c+'bzimage/'+name,'wb').write(b'\0'+p)
n=len(e); tok=bytes([0xf0])+bytes([255]*((n-15)//255))+bytes([(n-15)%255])+e
open(c+'bzimage/lz4','wb').write(b'\0'+struct.pack('<I',0x184c2102)+struct.pack('<I',len(tok))+tok+sz)
fh=bytes([0x28,0xb5,0x2f,0xfd,0x20,n])
blk=struct.pack('<I',(n<<3)|1)[:3]
open(c+'bzimage/zstd','wb').write(b'\0'+fh+blk+e+sz)
for i,l in enumerate(['GET /api/v1/vm/stats\n','PUT /api/v1/vm/balloon\n{"size":"48M"}','PUT /api/v1/vm/balloon\n{"bytes":8192}','PUT /api/v1/vm/shutdown\n','GET /api/v1/nope\n','PUT /api/v1/vm/pause\n','GET /api/v1/vm\n']):
    open(c+'api_line/%d'%i,'w').write(l)
def desc(addr,ln,flags,nxt): return struct.pack('<HHBB',addr//16,ln,flags,nxt)
B=0x10000
q=bytes([3])+desc(B,16,1,1)+desc(B+0x100,512,3,2)+desc(B+0x400,1,2,0)+bytes([1,0])
open(c+'virtio_block/read','wb').write(bytes([1])+q+struct.pack('<IIQ',0,0,0))
q=bytes([3])+desc(B,16,1,1)+desc(B+0x100,512,1,2)+desc(B+0x400,1,2,0)+bytes([1,0])
open(c+'virtio_block/write','wb').write(bytes([1])+q+struct.pack('<IIQ',1,0,2)+b'\x5a'*16)
open(c+'virtio_rng/two','wb').write(bytes([0,2])+desc(B,64,2,0)+desc(B+64,32,2,0)+bytes([2,0,1]))
open(c+'virtio_balloon/inflate','wb').write(bytes([0,1])+desc(B,8,0,0)+bytes([1,0])+bytes([0,0])+bytes([0,0])+bytes([0,0])+struct.pack('<II',0x20,0x21))
hdr=struct.pack('<QQIIIHHIII',3,2,1000,1234,0,1,1,0,65536,0)
open(c+'virtio_vsock/request','wb').write(bytes([0,1])+desc(B+0x1000,4096,2,0)+bytes([1,0])+bytes([1])+desc(B,44,0,0)+bytes([1,0])+bytes([0])+hdr)
ops=bytes([12])+struct.pack('<I',0)[:3]+bytes(8)
ops+=bytes([13])+struct.pack('<I',0x04)[:3]+struct.pack('<Q',0x6)
ops+=bytes([5])+struct.pack('<I',0x14)[:3]+struct.pack('<Q',3)
ops+=bytes([16])+struct.pack('<I',0x04)[:3]+bytes(8)
ops+=bytes([16])+struct.pack('<I',0x2000)[:3]+bytes(8)
open(c+'pci/setup','wb').write(ops)
# iommu: root table 0x1000, context table 0x2000 (00:01.0, domain 1), page tables 0x3000-0x6000
# mapping I/O address 0x10000 to 0x80000, invalidation queue 0x7000 with a wait descriptor
# (status at 0x7800); then Linux's enable sequence, a DMA write and the queue tail.
img=bytearray(0x8000)
def q(a,v): img[a:a+8]=struct.pack('<Q',v)
q(0x1000,0x2000|1); q(0x2000+16*8,0x3000|1); q(0x2008+16*8,2|(1<<8))
q(0x3000,0x4000|3); q(0x4000,0x5000|3); q(0x5000,0x6000|3); q(0x6000+8*0x10,0x80000|3)
q(0x7000,5|(1<<5)|(7<<32)); q(0x7008,0x7800)
def op(kind,at,ln,val): return bytes([kind])+struct.pack('<HBQ',at,ln,val)
ops=op(1,0x90,0,0x7000)+op(0,0x18,0,1<<26)+op(1,0x20,0,0x1000)+op(0,0x18,0,(1<<26)|(1<<30))
ops+=op(0,0x18,0,(1<<26)|(1<<31))+op(3,0x0008,4,0x10001)+op(1,0x88,0,0x10)+op(2,0x34,0,0)
os.makedirs(c+'iommu',exist_ok=True)
open(c+'iommu/enable_dma_wait','wb').write(bytes(img)+ops)
# virtio_net: options (bit 1 MRG_RXBUF, 2 CTRL_VQ, 4 NOTF_COAL); rx: one 2 KiB writable buffer;
# tx: one frame; ctrl: a NOTF_COAL command (class 6; cmd 1 RX_SET / 0 TX_SET: max packets, usecs).
def net(opts, cmd, data):
    s=bytes([opts])
    s+=bytes([1])+desc(B+0x2000,2048,2,0)+bytes([1,0])
    s+=bytes([1])+desc(B+0x1000,12+60,0,0)+bytes([1,0])
    s+=bytes([3])+desc(B+0x3000,2,1,1)+desc(B+0x3010,len(data),1,2)+desc(B+0x3020,1,2,0)+bytes([1,0])
    buf=bytearray(0x3100)
    buf[0:72]=bytes(12)+bytes([0xff]*6)+bytes([2,0,0,0,0,1])+b'\x08\x06'+bytes(46)
    buf[0x1000:0x1000+72]=bytes(12)+bytes([0xff]*6)+bytes([2,0,0,0,0,0x2a])+b'\x08\x06'+bytes(46)
    buf[0x3000:0x3002]=bytes([6,cmd])
    buf[0x3010:0x3010+len(data)]=data
    return s+bytes(buf)
open(c+'virtio_net/notf_coal_rx','wb').write(net(0x16,1,struct.pack('<II',16,50)))
open(c+'virtio_net/notf_coal_tx','wb').write(net(0x36,0,struct.pack('<II',8,2000000)))
open(c+'virtio_net/mac_table','wb').write(net(0x04,1,bytes(8)))
# acpi_e820: flags (bit 0 size from text, 1 ECAM in E820, 2 MCFG, 3 DMAR), u64 size, vCPUs,
# u64 ECAM base, start and end bus, u64 DMAR base, memory pick; text from byte 32.
def acpi(flags,size,cpus,base,sb,eb,dmar,pick,text=b''):
    b=bytes([flags])+struct.pack('<QBQBBQB',size,cpus,base,sb,eb,dmar,pick)
    return b+bytes(32-len(b))+text
open(c+'acpi_e820/q35','wb').write(acpi(0x0e,512<<20,2,0xe0000000,0,255,0xfed90000,3))
open(c+'acpi_e820/text_4g','wb').write(acpi(0x07,0,4,0xe0000000,0,0,0,2,b'4G'))
open(c+'acpi_e820/bad_ecam','wb').write(acpi(0x06,64<<20,255,0xfffffffffff00000,255,0,0,0))
