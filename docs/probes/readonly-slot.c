/*
 * What a guest register read costs on this host's KVM, trapping or from a
 * read-only memory slot (the measurement behind the virtio-mmio register page,
 * crates/devices/src/virtio/mmio/page.rs; BENCHMARKS.md, "Registers read from
 * memory").
 *
 *   gcc -O2 readonly-slot.c -o readonly-slot
 *   ./readonly-slot READS SLOT CPL
 *
 * READS: 32-bit reads of guest-physical 0xd0000060 in a loop; SLOT: 1 maps a
 * read-only memory slot there (0: nothing, every read exits as KVM_EXIT_MMIO);
 * CPL: 3 or 0, the privilege level the loop runs at (long mode, 2 MiB pages).
 * After the loop the guest writes 0xd0000050 (an ioeventfd: does it fire on a
 * read-only slot?) and 0xd0000064 (exits as an MMIO write; the host then changes
 * the page), reads 0xd0000060 again (does the guest see the change?) and leaves
 * with an `out`. Prints the time per read, the read exits, the last value read
 * and the eventfd's count.
 *
 * Measured 2026-12-04 (kvm_pvm): trapping 59 us per read at CPL3, 8.7 us at
 * CPL0; read-only slot ~0 at CPL3 (native), 1.1 us at CPL0 (emulated); the
 * ioeventfd fires; the write exits; the new value is seen.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	long reads = argc > 1 ? atol(argv[1]) : 100000;
	int slot = argc > 2 ? atoi(argv[2]) : 1;
	int cpl = argc > 3 ? atoi(argv[3]) : 3;
	int kvm = open("/dev/kvm", O_RDWR);
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	size_t size = 0x400000;
	uint8_t *mem = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct kvm_userspace_memory_region ram = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = size,
		.userspace_addr = (unsigned long)mem,
	};
	ioctl(vm, KVM_SET_USER_MEMORY_REGION, &ram);
	uint8_t *regs = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	*(uint32_t *)(regs + 0x60) = 0x1234;
	if (slot) {
		struct kvm_userspace_memory_region page = {
			.slot = 1, .flags = KVM_MEM_READONLY, .guest_phys_addr = 0xd0000000,
			.memory_size = 4096, .userspace_addr = (unsigned long)regs,
		};
		printf("read-only slot: %d\n", ioctl(vm, KVM_SET_USER_MEMORY_REGION, &page));
	}
	int efd = eventfd(0, EFD_NONBLOCK);
	struct kvm_ioeventfd notify = { .addr = 0xd0000050, .len = 4, .fd = efd };
	printf("ioeventfd: %d\n", ioctl(vm, KVM_IOEVENTFD, &notify));
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	struct {
		struct kvm_cpuid2 c;
		struct kvm_cpuid_entry2 e[200];
	} cpuid = { .c.nent = 200 };
	ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid);
	ioctl(vcpu, KVM_SET_CPUID2, &cpuid);
	/* Page tables: the first 4 MiB and the 2 MiB at 0xd0000000, user-accessible. */
	uint64_t *pml4 = (void *)(mem + 0x2000), *pdpt = (void *)(mem + 0x3000);
	uint64_t *pd = (void *)(mem + 0x4000), *pd3 = (void *)(mem + 0x5000);
	pml4[0] = 0x3000 | 7;
	pdpt[0] = 0x4000 | 7;
	pdpt[3] = 0x5000 | 7;
	pd[0] = 0x87;
	pd[1] = (1 << 21) | 0x87;
	pd3[0x80] = 0xd0000000ull | 0x87;
	uint8_t code[128];
	int n = 0;
	uint64_t at = 0xd0000060;
	code[n++] = 0x48, code[n++] = 0xb9; /* mov rcx, reads */
	memcpy(code + n, &reads, 8), n += 8;
	code[n++] = 0x48, code[n++] = 0xbb; /* mov rbx, 0xd0000060 */
	memcpy(code + n, &at, 8), n += 8;
	uint8_t loop[] = {
		0x8b, 0x03,             /* mov eax, [rbx] */
		0x48, 0xff, 0xc9,       /* dec rcx */
		0x75, 0xf9,             /* jnz loop */
		0xc7, 0x43, 0xf0, 1, 0, 0, 0, /* mov dword [rbx-0x10], 1: notify */
		0xc7, 0x43, 0x04, 7, 0, 0, 0, /* mov dword [rbx+4], 7: acknowledge */
		0x8b, 0x03,             /* mov eax, [rbx] */
		0x66, 0xba, 0xf8, 0x03, /* mov dx, 0x3f8 */
		0xee,                   /* out dx, al */
		0xf4,
	};
	memcpy(code + n, loop, sizeof loop), n += sizeof loop;
	memcpy(mem + 0x10000, code, n);
	struct kvm_sregs s;
	ioctl(vcpu, KVM_GET_SREGS, &s);
	s.cr3 = 0x2000;
	s.cr4 = 1 << 5;
	s.cr0 = 0x80000001 | (1 << 4);
	s.efer = 0x500;
	struct kvm_segment seg = {
		.base = 0, .limit = 0xffffffff, .selector = cpl == 3 ? 0x1b : 0x08,
		.present = 1, .type = 11, .dpl = cpl, .s = 1, .l = 1, .g = 1,
	};
	s.cs = seg;
	seg.type = 3, seg.selector = cpl == 3 ? 0x23 : 0x10, seg.l = 0, seg.db = 1;
	s.ds = s.es = s.fs = s.gs = s.ss = seg;
	ioctl(vcpu, KVM_SET_SREGS, &s);
	struct kvm_regs r = { .rip = 0x10000, .rflags = 2 | (3 << 12), .rsp = 0x200000 };
	ioctl(vcpu, KVM_SET_REGS, &r);
	double t0 = now();
	long exits = 0;
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			perror("KVM_RUN");
			return 1;
		}
		if (run->exit_reason == KVM_EXIT_MMIO) {
			if (run->mmio.is_write) {
				printf("MMIO write %llx = %x\n", run->mmio.phys_addr, *(uint32_t *)run->mmio.data);
				*(uint32_t *)(regs + 0x60) = 0x5678;
			} else {
				exits++;
				*(uint32_t *)run->mmio.data = 0x1234;
			}
			continue;
		}
		if (run->exit_reason == KVM_EXIT_IO) {
			struct kvm_regs q;
			uint64_t count = 0;
			ioctl(vcpu, KVM_GET_REGS, &q);
			printf("%.2f us per read, %ld read exits, last read %llx, eventfd %lu\n",
			       (now() - t0) * 1e6 / reads, exits, q.rax,
			       read(efd, &count, 8) == 8 ? count : 0);
			return 0;
		}
		printf("exit %d\n", run->exit_reason);
		return 1;
	}
}
