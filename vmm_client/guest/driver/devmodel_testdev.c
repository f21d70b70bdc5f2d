// SPDX-License-Identifier: GPL-2.0
/*
 * devmodel_testdev: a Linux driver for devmodel's PCI test device (1234:7e57).
 *
 * It exists so that tests can check, from inside a real guest, the paths a
 * userspace driver cannot reach without VFIO_NOIOMMU: MSI-X vectors (through
 * QEMU's vfio-user MSI-X emulation and our bridge) and bus-master DMA into
 * guest memory. Everything is driven through sysfs attributes on the PCI
 * device:
 *
 *   irq_mode    "msix" or "intx"
 *   irq_counts  interrupts seen per vector (INTx: per IRQ_STATUS cause bit)
 *   ring        write N: ring doorbell vector N and wait for its interrupt
 *   scratch     the SCRATCH register (read/write)
 *   dma_test    write N (1..4096): round trip N bytes guest -> device RAM
 *               -> guest; read: "ok", "not run", or why it failed
 *
 * Register map: devserver/devices/testdev.py (BAR2, memory).
 */

#include <linux/atomic.h>
#include <linux/completion.h>
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/sysfs.h>
#include <linux/wait.h>

#define DRV_NAME "devmodel_testdev"

#define TESTDEV_VENDOR_ID	0x1234
#define TESTDEV_DEVICE_ID	0x7e57
#define TESTDEV_ID_VALUE	0x7e570001

#define TESTDEV_MEM_BAR		2

#define REG_ID			0x00
#define REG_SCRATCH		0x04
#define REG_DOORBELL		0x08
#define REG_IRQ_STATUS		0x0c
#define REG_BAR_INDEX		0x10
#define REG_DMA_ADDR_LO		0x18
#define REG_DMA_ADDR_HI		0x1c
#define REG_DMA_LEN		0x20
#define REG_DMA_CMD		0x24
#define REG_DMA_STATUS		0x28

#define DMA_CMD_FROM_GUEST	1
#define DMA_CMD_TO_GUEST	2

#define DMA_STATUS_BUSY		BIT(0)
#define DMA_STATUS_DONE		BIT(1)
#define DMA_STATUS_ERROR	BIT(2)
#define DMA_STATUS_W1C		(DMA_STATUS_DONE | DMA_STATUS_ERROR)

/* The device's 4 KiB of RAM in BAR2, the target and source of its DMA. */
#define RAM_OFFSET		0x1000
#define RAM_SIZE		0x1000

#define MAX_VECTORS		4
/* DMA completion raises this MSI-X vector, or this IRQ_STATUS bit on INTx. */
#define DMA_VECTOR		1

/* Generous: under TCG every access crosses QEMU, a socket and gRPC. */
#define RING_TIMEOUT_MS		5000
#define DMA_TIMEOUT_MS		10000

static bool use_msix = true;
module_param(use_msix, bool, 0444);
MODULE_PARM_DESC(use_msix, "Use MSI-X when the device has it (default 1); 0 forces INTx");

struct testdev;

struct testdev_vector {
	struct testdev *td;
	unsigned int index;
	char name[48];
};

struct testdev {
	struct pci_dev *pdev;
	void __iomem *regs;
	bool msix;
	unsigned int nvec;	/* Linux IRQs requested: 1 for INTx */
	struct testdev_vector vec[MAX_VECTORS];
	/*
	 * Per vector in MSI-X mode; per IRQ_STATUS cause bit in INTx mode,
	 * so ring N is visible as count N either way.
	 */
	atomic_t counts[MAX_VECTORS];
	wait_queue_head_t irq_wait;

	struct mutex dma_lock;	/* one dma_test at a time; guards dma_result */
	bool dma_waiting;	/* a DMA is in flight and wants its completion */
	u32 dma_irq_status;	/* DMA_STATUS as the interrupt handler saw it */
	struct completion dma_done;
	u8 dma_seq;		/* varies the pattern, so stale data never passes */
	char dma_result[128];
};

static void testdev_dma_irq(struct testdev *td)
{
	u32 status;

	/*
	 * Vector 1 is also a doorbell vector: only a DMA in flight with a
	 * done or error bit set is a completion.
	 */
	if (!READ_ONCE(td->dma_waiting))
		return;
	status = readl(td->regs + REG_DMA_STATUS);
	if (!(status & DMA_STATUS_W1C))
		return;
	td->dma_irq_status = status;
	WRITE_ONCE(td->dma_waiting, false);
	complete(&td->dma_done);
}

static irqreturn_t testdev_msix_irq(int irq, void *data)
{
	struct testdev_vector *v = data;
	struct testdev *td = v->td;

	atomic_inc(&td->counts[v->index]);
	if (v->index == DMA_VECTOR)
		testdev_dma_irq(td);
	wake_up(&td->irq_wait);
	return IRQ_HANDLED;
}

static irqreturn_t testdev_intx_irq(int irq, void *data)
{
	struct testdev_vector *v = data;
	struct testdev *td = v->td;
	unsigned long status;
	unsigned int bit;

	status = readl(td->regs + REG_IRQ_STATUS);
	/* The line may be shared (and is, with a second test device). */
	if (!status)
		return IRQ_NONE;
	/* W1C: the device drops INTx once no cause is left. */
	writel(status, td->regs + REG_IRQ_STATUS);
	for_each_set_bit(bit, &status, MAX_VECTORS)
		atomic_inc(&td->counts[bit]);
	if (status & BIT(DMA_VECTOR))
		testdev_dma_irq(td);
	wake_up(&td->irq_wait);
	return IRQ_HANDLED;
}

static struct testdev *to_testdev(struct device *dev)
{
	return dev_get_drvdata(dev);
}

static ssize_t irq_mode_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%s\n", to_testdev(dev)->msix ? "msix" : "intx");
}
static DEVICE_ATTR_RO(irq_mode);

static ssize_t irq_counts_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct testdev *td = to_testdev(dev);
	unsigned int n = td->msix ? td->nvec : MAX_VECTORS;
	unsigned int i;
	int len = 0;

	for (i = 0; i < n; i++)
		len += sysfs_emit_at(buf, len, "%s%d", i ? " " : "",
				     atomic_read(&td->counts[i]));
	len += sysfs_emit_at(buf, len, "\n");
	return len;
}
static DEVICE_ATTR_RO(irq_counts);

static ssize_t ring_store(struct device *dev, struct device_attribute *attr,
			  const char *buf, size_t count)
{
	struct testdev *td = to_testdev(dev);
	unsigned int vector;
	int before;
	long left;
	int ret;

	ret = kstrtouint(buf, 0, &vector);
	if (ret)
		return ret;
	if (vector >= (td->msix ? td->nvec : MAX_VECTORS))
		return -EINVAL;
	before = atomic_read(&td->counts[vector]);
	writel(vector, td->regs + REG_DOORBELL);
	/*
	 * Wait for the interrupt, so a test script can read irq_counts right
	 * after the write instead of polling for an asynchronous delivery.
	 */
	left = wait_event_interruptible_timeout(td->irq_wait,
						atomic_read(&td->counts[vector]) != before,
						msecs_to_jiffies(RING_TIMEOUT_MS));
	if (left < 0)
		return left;
	if (!left)
		return -ETIMEDOUT;
	return count;
}
static DEVICE_ATTR_WO(ring);

static ssize_t scratch_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "0x%08x\n", readl(to_testdev(dev)->regs + REG_SCRATCH));
}

static ssize_t scratch_store(struct device *dev, struct device_attribute *attr,
			     const char *buf, size_t count)
{
	u32 value;
	int ret;

	ret = kstrtou32(buf, 0, &value);
	if (ret)
		return ret;
	writel(value, to_testdev(dev)->regs + REG_SCRATCH);
	return count;
}
static DEVICE_ATTR_RW(scratch);

static u8 dma_pattern(u8 seq, unsigned int i)
{
	/* 13 is odd, so consecutive runs' patterns differ in every byte. */
	return (u8)(i * 7 + seq * 13 + 1);
}

/*
 * One transfer: program the engine, wait for the completion interrupt,
 * check DMA_STATUS. Returns 0, or -ETIMEDOUT if the device may still be
 * writing (so the caller must not free the buffer), or -EIO.
 */
static int testdev_dma_run(struct testdev *td, u32 cmd, dma_addr_t addr, u32 len,
			   const char *what)
{
	unsigned long left;
	u32 status;

	reinit_completion(&td->dma_done);
	td->dma_irq_status = 0;
	/* A stale done bit must not pass for this transfer's completion. */
	writel(DMA_STATUS_W1C, td->regs + REG_DMA_STATUS);
	writel(lower_32_bits(addr), td->regs + REG_DMA_ADDR_LO);
	writel(upper_32_bits(addr), td->regs + REG_DMA_ADDR_HI);
	writel(len, td->regs + REG_DMA_LEN);
	/* Before the command: the completion may come before writel returns. */
	WRITE_ONCE(td->dma_waiting, true);
	/* writel orders the buffer's contents before the command on x86. */
	writel(cmd, td->regs + REG_DMA_CMD);
	left = wait_for_completion_timeout(&td->dma_done, msecs_to_jiffies(DMA_TIMEOUT_MS));
	WRITE_ONCE(td->dma_waiting, false);
	/* After a timeout, a late handler must not complete the next transfer. */
	synchronize_irq(pci_irq_vector(td->pdev, td->msix ? DMA_VECTOR : 0));
	status = readl(td->regs + REG_DMA_STATUS);
	writel(status & DMA_STATUS_W1C, td->regs + REG_DMA_STATUS);
	if (!left) {
		if (status & DMA_STATUS_BUSY) {
			snprintf(td->dma_result, sizeof(td->dma_result),
				 "%s: still busy after %d ms (status 0x%x)",
				 what, DMA_TIMEOUT_MS, status);
			return -ETIMEDOUT;
		}
		snprintf(td->dma_result, sizeof(td->dma_result),
			 "%s: no completion interrupt in %d ms (status 0x%x)",
			 what, DMA_TIMEOUT_MS, status);
		return -EIO;
	}
	status |= td->dma_irq_status;
	if (status & DMA_STATUS_ERROR) {
		snprintf(td->dma_result, sizeof(td->dma_result),
			 "%s: device reported an error (status 0x%x)", what, status);
		return -EIO;
	}
	if (!(status & DMA_STATUS_DONE)) {
		snprintf(td->dma_result, sizeof(td->dma_result),
			 "%s: interrupt without done (status 0x%x)", what, status);
		return -EIO;
	}
	return 0;
}

/* The bitwise complement of the pattern: a transfer that did nothing never passes. */
static u32 dma_poison(u8 seq, u32 at)
{
	u32 word = 0;
	unsigned int b;

	for (b = 0; b < 4; b++)
		word |= (u32)dma_pattern(seq, at + b) << (8 * b);
	return ~word;
}

static int testdev_dma_test(struct testdev *td, u32 len)
{
	struct device *dev = &td->pdev->dev;
	void __iomem *ram = td->regs + RAM_OFFSET;
	/* Poison a little past len, to catch a device writing too much. */
	u32 span = min_t(u32, round_up(len, 4) + 4, RAM_SIZE);
	dma_addr_t handle;
	u8 *before;
	u8 *after;
	u8 *buf;
	u8 seq;
	u32 i;
	int ret;

	if (td->msix && td->nvec <= DMA_VECTOR) {
		snprintf(td->dma_result, sizeof(td->dma_result),
			 "no MSI-X vector %d for the DMA completion (%u vectors)",
			 DMA_VECTOR, td->nvec);
		return -ENODEV;
	}
	seq = ++td->dma_seq;
	buf = dma_alloc_coherent(dev, RAM_SIZE, &handle, GFP_KERNEL);
	before = kmalloc(2 * RAM_SIZE, GFP_KERNEL);
	if (!buf || !before) {
		snprintf(td->dma_result, sizeof(td->dma_result), "out of memory");
		ret = -ENOMEM;
		goto out;
	}
	after = before + RAM_SIZE;
	for (i = 0; i < RAM_SIZE; i++)
		buf[i] = dma_pattern(seq, i);
	for (i = 0; i < span; i += 4)
		writel(dma_poison(seq, i), ram + i);
	/* Read back rather than assumed: what the device holds is what counts. */
	memcpy_fromio(before, ram, span);

	ret = testdev_dma_run(td, DMA_CMD_FROM_GUEST, handle, len, "to device");
	if (ret)
		goto out;
	memcpy_fromio(after, ram, span);
	for (i = 0; i < span; i++) {
		/* Beyond len the poison must be left alone. */
		u8 want = i < len ? dma_pattern(seq, i) : before[i];

		if (after[i] != want) {
			snprintf(td->dma_result, sizeof(td->dma_result),
				 "to device: device RAM byte %u is 0x%02x, want 0x%02x",
				 i, after[i], want);
			ret = -EIO;
			goto out;
		}
	}

	memset(buf, 0, RAM_SIZE);
	ret = testdev_dma_run(td, DMA_CMD_TO_GUEST, handle, len, "to guest");
	if (ret)
		goto out;
	for (i = 0; i < RAM_SIZE; i++) {
		/* Beyond len the buffer must keep the zeroes written above. */
		u8 want = i < len ? dma_pattern(seq, i) : 0;

		if (buf[i] != want) {
			snprintf(td->dma_result, sizeof(td->dma_result),
				 "to guest: buffer byte %u is 0x%02x, want 0x%02x",
				 i, buf[i], want);
			ret = -EIO;
			goto out;
		}
	}
	snprintf(td->dma_result, sizeof(td->dma_result), "ok");
out:
	kfree(before);
	if (buf) {
		/*
		 * A device still busy may yet write into the buffer: leaking
		 * 4 KiB beats corrupting whatever reuses it.
		 */
		if (ret == -ETIMEDOUT)
			dev_warn(dev, "DMA timed out; leaking its buffer\n");
		else
			dma_free_coherent(dev, RAM_SIZE, buf, handle);
	}
	return ret;
}

static ssize_t dma_test_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct testdev *td = to_testdev(dev);
	ssize_t ret;

	mutex_lock(&td->dma_lock);
	ret = sysfs_emit(buf, "%s\n", td->dma_result);
	mutex_unlock(&td->dma_lock);
	return ret;
}

/*
 * The write succeeds whenever the length is valid; the outcome is read back,
 * so a script under `set -e` still gets to print the reason.
 */
static ssize_t dma_test_store(struct device *dev, struct device_attribute *attr,
			      const char *buf, size_t count)
{
	struct testdev *td = to_testdev(dev);
	u32 len;
	int ret;

	ret = kstrtou32(buf, 0, &len);
	if (ret)
		return ret;
	if (len < 1 || len > RAM_SIZE)
		return -EINVAL;
	ret = mutex_lock_interruptible(&td->dma_lock);
	if (ret)
		return ret;
	testdev_dma_test(td, len);
	mutex_unlock(&td->dma_lock);
	return count;
}
static DEVICE_ATTR_RW(dma_test);

static struct attribute *testdev_attrs[] = {
	&dev_attr_irq_mode.attr,
	&dev_attr_irq_counts.attr,
	&dev_attr_ring.attr,
	&dev_attr_scratch.attr,
	&dev_attr_dma_test.attr,
	NULL,
};
ATTRIBUTE_GROUPS(testdev);

static void testdev_free_irqs(struct testdev *td, unsigned int requested)
{
	while (requested--)
		free_irq(pci_irq_vector(td->pdev, requested), &td->vec[requested]);
	pci_free_irq_vectors(td->pdev);
}

static int testdev_setup_irqs(struct testdev *td)
{
	struct pci_dev *pdev = td->pdev;
	unsigned int flags = PCI_IRQ_LEGACY;
	unsigned int i;
	int nvec;
	int ret;

	if (use_msix)
		flags |= PCI_IRQ_MSIX;
	nvec = pci_alloc_irq_vectors(pdev, 1, MAX_VECTORS, flags);
	if (nvec < 0)
		return nvec;
	td->nvec = nvec;
	td->msix = pdev->msix_enabled;
	for (i = 0; i < td->nvec; i++) {
		struct testdev_vector *v = &td->vec[i];

		v->td = td;
		v->index = i;
		snprintf(v->name, sizeof(v->name), "%s[%s]-%s%u", DRV_NAME, pci_name(pdev),
			 td->msix ? "msix" : "intx", i);
		if (td->msix)
			ret = request_irq(pci_irq_vector(pdev, i), testdev_msix_irq, 0, v->name, v);
		else
			ret = request_irq(pci_irq_vector(pdev, i), testdev_intx_irq, IRQF_SHARED,
					  v->name, v);
		if (ret) {
			testdev_free_irqs(td, i);
			return ret;
		}
	}
	return 0;
}

static int testdev_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct testdev *td;
	unsigned int i;
	u32 ident;
	int ret;

	td = devm_kzalloc(dev, sizeof(*td), GFP_KERNEL);
	if (!td)
		return -ENOMEM;
	td->pdev = pdev;
	init_waitqueue_head(&td->irq_wait);
	mutex_init(&td->dma_lock);
	init_completion(&td->dma_done);
	strscpy(td->dma_result, "not run", sizeof(td->dma_result));
	for (i = 0; i < MAX_VECTORS; i++)
		atomic_set(&td->counts[i], 0);

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	td->regs = pcim_iomap(pdev, TESTDEV_MEM_BAR, 0);
	if (!td->regs)
		return -ENOMEM;
	ident = readl(td->regs + REG_ID);
	if (ident != TESTDEV_ID_VALUE) {
		dev_err(dev, "ID register reads 0x%08x, want 0x%08x\n", ident, TESTDEV_ID_VALUE);
		return -ENODEV;
	}
	ret = dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64));
	if (ret) {
		dev_err(dev, "no 64-bit DMA: %d\n", ret);
		return ret;
	}
	pci_set_master(pdev);
	/* Drvdata before the IRQs: a shared INTx line may call in at once. */
	pci_set_drvdata(pdev, td);
	ret = testdev_setup_irqs(td);
	if (ret) {
		dev_err(dev, "cannot set up interrupts: %d\n", ret);
		pci_clear_master(pdev);
		return ret;
	}
	dev_info(dev, "%s, %u vector%s, BAR2 at %pR\n", td->msix ? "MSI-X" : "INTx", td->nvec,
		 td->nvec == 1 ? "" : "s", &pdev->resource[TESTDEV_MEM_BAR]);
	return 0;
}

static void testdev_remove(struct pci_dev *pdev)
{
	struct testdev *td = pci_get_drvdata(pdev);

	/*
	 * The sysfs attributes are gone by now (the driver core removes
	 * dev_groups first and waits for their users), so no DMA is in flight.
	 */
	pci_clear_master(pdev);
	testdev_free_irqs(td, td->nvec);
	/* pcim_* undo the mapping and the enable. */
}

static const struct pci_device_id testdev_ids[] = {
	{ PCI_DEVICE(TESTDEV_VENDOR_ID, TESTDEV_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, testdev_ids);

static struct pci_driver testdev_driver = {
	.name = DRV_NAME,
	.id_table = testdev_ids,
	.probe = testdev_probe,
	.remove = testdev_remove,
	/*
	 * The driver core adds these after probe and removes them before
	 * remove. (pci_register_driver copies this field over the
	 * device_driver's, so it must be set here.)
	 */
	.dev_groups = testdev_groups,
};
module_pci_driver(testdev_driver);

MODULE_DESCRIPTION("Driver for devmodel's PCI test device: MSI-X, INTx and DMA checks");
MODULE_AUTHOR("devmodel");
MODULE_LICENSE("GPL");
