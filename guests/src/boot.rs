//! Boot code: the PVH note, 32-bit entry, static page tables, GDT/TSS, trap stubs, CPL3 switch,
//! the AP real-mode trampoline and the C memory primitives. All of it is assembly.

use core::arch::global_asm;

/// Selectors of the kit's GDT (see `kit_gdt` below).
pub const KERNEL_CS: u16 = 0x08;
pub const USER_DS: u16 = 0x23;
pub const USER_CS: u16 = 0x2b;
pub const TSS_SEL: u16 = 0x30;
/// `rax` value with which the CPL3 exit stub (or `kit_syscall_entry`) executes `ud2`.
pub const USER_EXIT_MAGIC: u64 = 0x4b49_5455_5345_5221;

global_asm!(
    r#"
/* ---- PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), like Linux: 8-byte descriptor, value < 4 GiB. */
.pushsection .note.pvh, "a", @note
.balign 4
.long 4
.long 8
.long 18
.asciz "Xen"
.quad pvh_start32
.popsection

/* ---- 32-bit PVH entry: flat protected mode, paging off, ebx = hvm_start_info. */
.pushsection .text.boot, "ax"
.code32
.globl pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi
    rdtsc
    movl %eax, kit_boot_tsc
    movl %edx, kit_boot_tsc + 4
    lgdt kit_gdt_ptr
    movl $0x620, %eax          /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $kit_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx     /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax     /* clear EM */
    orl $0x80000023, %eax      /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp $0x08, $kit_start64
.code64
kit_start64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $kit_bsp_stack_top, %esp
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $3, %ecx
    xorl %eax, %eax
    rep stosq
    movl %esi, %edi
    call kit_rust_start
1:  cli
    hlt
    jmp 1b
.popsection

/* ---- AP trampoline: copied to 0x10000 (SIPI vector 0x10), real mode -> long mode directly. */
.pushsection .text, "ax"
.code16
.globl kit_tramp_start
.globl kit_tramp_end
kit_tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl kit_tramp_gdtr - kit_tramp_start
    movl $0x620, %eax
    movl %eax, %cr4
    movl $kit_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax
    orl $0x80000023, %eax
    movl %eax, %cr0
    ljmpl $0x08, $kit_ap_start64
.balign 4
kit_tramp_gdtr:
    .word kit_gdt_end - kit_gdt - 1
    .long kit_gdt
kit_tramp_end:
.code64
kit_ap_start64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %eax
    lock xaddl %eax, kit_ap_slot(%rip)
    cmpl $16, %eax
    jae 2f
    movl %eax, %edi
    incl %eax
    shll $14, %eax
    leaq kit_ap_stacks(%rip), %rsp
    addq %rax, %rsp
    call kit_ap_rust
2:  cli
    hlt
    jmp 2b

/* ---- Trap stubs: 256 of 16 bytes each; push a dummy error code where the CPU pushes none. */
.balign 16
.globl kit_trap_stubs
kit_trap_stubs:
.set vec, 0
.rept 256
.balign 16
.if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
.else
    pushq $0
.endif
    pushq $vec
    jmp kit_trap_common
.set vec, vec + 1
.endr

kit_trap_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    cld
    call kit_trap
    movq %rbx, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

/* ---- CPL3: kit_run_user_asm(f, arg, user_rsp, rflags) -> u64, returns via kit_user_return. */
.globl kit_run_user_asm
kit_run_user_asm:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, kit_user_ctx(%rip)
    movq %rsp, kit_tss+4(%rip)
    pushq $0x23
    pushq %rdx
    pushq %rcx
    pushq $0x2b
    leaq kit_user_tramp(%rip), %rax
    pushq %rax
    movq %rdi, %rax
    movq %rsi, %rdi
    iretq
kit_user_tramp:
    call *%rax
    movq %rax, %rdi
    movabsq ${magic}, %rax
    ud2

.globl kit_user_return
kit_user_return:
    movq kit_user_ctx(%rip), %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    movq %rdi, %rax
    ret

/* ---- A SYSCALL target: reports its CPL (mov %cs) through the ud2 exit. */
.globl kit_syscall_entry
kit_syscall_entry:
    movw %cs, %di
    movzwl %di, %edi
    andl $3, %edi
    movabsq ${magic}, %rax
    ud2

/* ---- C memory primitives (the host target's compiler-builtins does not provide them). */
.globl memcpy
memcpy:
    movq %rdi, %rax
    movq %rdx, %rcx
    shrq $3, %rcx
    rep movsq
    movl %edx, %ecx
    andl $7, %ecx
    rep movsb
    ret
.globl memset
memset:
    movq %rdi, %r9
    movzbl %sil, %eax
    movabsq $0x0101010101010101, %r8
    imulq %r8, %rax
    movq %rdx, %rcx
    shrq $3, %rcx
    rep stosq
    movl %edx, %ecx
    andl $7, %ecx
    rep stosb
    movq %r9, %rax
    ret
.globl memmove
memmove:
    cmpq %rsi, %rdi
    jbe memcpy
    leaq (%rsi,%rdx), %rax
    cmpq %rax, %rdi
    jae memcpy
    movq %rdi, %rax
    leaq -1(%rsi,%rdx), %rsi
    leaq -1(%rdi,%rdx), %rdi
    movq %rdx, %rcx
    std
    rep movsb
    cld
    ret
.globl memcmp
.globl bcmp
memcmp:
bcmp:
    xorl %eax, %eax
    testq %rdx, %rdx
    jz 4f
3:  movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    subl %ecx, %eax
    jnz 4f
    incq %rdi
    incq %rsi
    decq %rdx
    jnz 3b
4:  ret
.popsection

/* ---- Data: identity map of 4 GiB with 2 MiB user-accessible pages (last GiB uncached). */
.pushsection .data.pagetables, "aw"
.balign 4096
.globl kit_pml4
kit_pml4:
    .quad kit_pdpt + 7
    .fill 511, 8, 0
kit_pdpt:
    .quad kit_pd + 7
    .quad kit_pd + 0x1000 + 7
    .quad kit_pd + 0x2000 + 7
    .quad kit_pd + 0x3000 + 7
    .fill 508, 8, 0
kit_pd:
.set pde, 0
.rept 2048
.if pde >= 1536
    .quad (pde << 21) | 0x9f
.else
    .quad (pde << 21) | 0x87
.endif
.set pde, pde + 1
.endr
.popsection

.pushsection .data, "aw"
.balign 16
.globl kit_gdt
kit_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00cffa000000ffff    /* 0x18 user code, 32-bit (SYSRET layout) */
    .quad 0x00cff2000000ffff    /* 0x20 user data */
    .quad 0x00affa000000ffff    /* 0x28 user code, 64-bit */
    .quad 0, 0                  /* 0x30 TSS, filled at run time */
kit_gdt_end:
.balign 8
kit_gdt_ptr:
    .word kit_gdt_end - kit_gdt - 1
    .quad kit_gdt
.balign 16
.globl kit_tss
kit_tss:
    .skip 102
    .word 104
    .fill 8192, 1, 0            /* I/O permission bitmap: every port allowed at CPL3 */
    .byte 0xff
.balign 8
kit_user_ctx:
    .quad 0
.globl kit_boot_tsc
kit_boot_tsc:
    .quad 0
.globl kit_ap_slot
kit_ap_slot:
    .long 0
.popsection

.pushsection .stacks, "aw", @nobits
.balign 4096
    .skip 65536
kit_bsp_stack_top:
.globl kit_user_stack_top
    .skip 65536
kit_user_stack_top:
.globl kit_ap_stacks
kit_ap_stacks:
    .skip 16384 * 16
.popsection
"#,
    magic = const USER_EXIT_MAGIC,
    options(att_syntax)
);
