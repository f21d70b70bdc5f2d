/* Time MMIO reads and writes of a PCI BAR from a Linux guest's user space.
 *
 *   guest_mmio /sys/bus/pci/devices/0000:01:00.0/resource2 OFFSET READS WRITES
 *
 * Maps the BAR through sysfs, reads the 32-bit register at OFFSET READS times
 * and writes it WRITES times, and prints ns per access. Built static on the
 * host, so it runs in the busybox initramfs.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s RESOURCE OFFSET READS WRITES\n", argv[0]);
		return 2;
	}
	long offset = strtol(argv[2], NULL, 0);
	long reads = strtol(argv[3], NULL, 0), writes = strtol(argv[4], NULL, 0);
	int fd = open(argv[1], O_RDWR | O_SYNC);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	volatile uint8_t *bar = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (bar == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	volatile uint32_t *reg = (volatile uint32_t *)(bar + offset);
	uint32_t sum = 0;
	double t0 = now_ns();
	for (long i = 0; i < reads; i++)
		sum += *reg;
	double t1 = now_ns();
	for (long i = 0; i < writes; i++)
		*reg = (uint32_t)i;
	(void)*reg; /* posted writes are flushed by the next read */
	double t2 = now_ns();
	printf("read_ns %.0f\nwrite_ns %.0f\nvalue %#x\n", (t1 - t0) / reads,
	       writes ? (t2 - t1) / writes : 0.0, sum / (uint32_t)(reads ? reads : 1));
	return 0;
}
