/*
 * bare-kvm-loop: the smallest process that runs a flat 64-bit guest image
 * on KVM, for comparing whole-process costs with `vmm run` (README,
 * Performance). Same entry state as `vmm run --mode long` (GDT at 0x1000,
 * identity map of 4 GiB in 2 MiB pages at 0x2000-0x7fff, CR0/CR4/EFER,
 * KVM_GET_SUPPORTED_CPUID, XCR0 from CPUID leaf 0xD, RSP at the top of
 * RAM), 128 MiB of RAM, the image at 0x100000. Serves nothing: COM1
 * output goes to stdout, other port and MMIO exits re-enter at once.
 * Ends on a write V to isa-debug-exit (port 0xf4: status (V << 1) | 1)
 * or HLT (status 0); anything else is status 6.
 *
 *   cc -O2 -o /tmp/bare-kvm-loop scripts/bare-kvm-loop.c
 *   /tmp/bare-kvm-loop image.bin
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define RAM_SIZE (128u << 20)
#define LOAD_ADDR 0x100000u

static void die(const char *what)
{
	perror(what);
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s IMAGE\n", argv[0]);
		return 2;
	}
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	uint8_t *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ram == MAP_FAILED)
		die("mmap");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE,
		.userspace_addr = (uint64_t)ram,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	FILE *f = fopen(argv[1], "rb");
	if (!f)
		die(argv[1]);
	size_t n = fread(ram + LOAD_ADDR, 1, RAM_SIZE - LOAD_ADDR, f);
	fclose(f);
	if (n == 0) {
		fprintf(stderr, "empty image\n");
		return 2;
	}

	/* GDT: null, code32, data, code64 (as the VMM's). */
	uint64_t *gdt = (uint64_t *)(ram + 0x1000);
	gdt[0] = 0;
	gdt[1] = 0x00cf9b000000ffffull;
	gdt[2] = 0x00cf93000000ffffull;
	gdt[3] = 0x00af9b000000ffffull;
	/* PML4 -> PDPT -> 4 page directories of 2 MiB pages, user-accessible. */
	uint64_t *pml4 = (uint64_t *)(ram + 0x2000), *pdpt = (uint64_t *)(ram + 0x3000);
	pml4[0] = 0x3000 | 7;
	for (int i = 0; i < 4; i++) {
		uint64_t *pd = (uint64_t *)(ram + 0x4000 + 0x1000 * i);
		pdpt[i] = (0x4000 + 0x1000 * i) | 7;
		for (int j = 0; j < 512; j++)
			pd[j] = ((uint64_t)(i * 512 + j) << 21) | 0x87;
	}

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	struct {
		struct kvm_cpuid2 c;
		struct kvm_cpuid_entry2 e[256];
	} cpuid2 = { .c.nent = 256 };
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid2) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	uint64_t xcr0 = 0;
	for (uint32_t i = 0; i < cpuid2.c.nent; i++) {
		struct kvm_cpuid_entry2 *e = &cpuid2.e[i];
		if (e->function == 1)
			e->ecx |= 1u << 31; /* hypervisor */
		if (e->function == 0xd && e->index == 0)
			xcr0 = e->eax | ((uint64_t)e->edx << 32);
	}
	if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid2) < 0)
		die("KVM_SET_CPUID2");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	struct kvm_segment code = {
		.base = 0, .limit = 0xffffffff, .selector = 0x18, .type = 0xb,
		.present = 1, .s = 1, .l = 1, .g = 1,
	};
	struct kvm_segment data = code;
	data.selector = 0x10;
	data.type = 0x3;
	data.l = 0;
	data.db = 1;
	sregs.cs = code;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.gdt.base = 0x1000;
	sregs.gdt.limit = 4 * 8 - 1;
	sregs.cr3 = 0x2000;
	sregs.cr0 = 0x80000033;	      /* PG NE ET MP PE */
	sregs.cr4 = 0x40620;	      /* OSXSAVE OSXMMEXCPT OSFXSR PAE */
	sregs.efer = 0xd00;	      /* NXE LMA LME */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rflags = 2, .rip = LOAD_ADDR, .rsp = RAM_SIZE };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
	if (xcr0) {
		struct kvm_xcrs xcrs = { .nr_xcrs = 1 };
		xcrs.xcrs[0].xcr = 0;
		xcrs.xcrs[0].value = xcr0;
		if (ioctl(vcpu, KVM_SET_XCRS, &xcrs) < 0)
			die("KVM_SET_XCRS");
	}

	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN");
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			if (run->io.direction == KVM_EXIT_IO_OUT) {
				uint8_t *d = (uint8_t *)run + run->io.data_offset;
				if (run->io.port == 0xf4)
					return (d[0] << 1) | 1;
				if (run->io.port == 0x3f8)
					fwrite(d, run->io.size, run->io.count, stdout);
			}
			break;
		case KVM_EXIT_MMIO:
			break;
		case KVM_EXIT_HLT:
			return 0;
		default:
			fprintf(stderr, "exit reason %u\n", run->exit_reason);
			return 6;
		}
	}
}
