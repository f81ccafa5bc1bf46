/*
 * vmcorefs._readpath -- the native READ path of the FUSE adapter.
 *
 * Why it exists: every FUSE request that goes through pyfuse3 costs the
 * daemon ~20-50 us of Python (docs/benchmarks.md, "Where time goes"), and a
 * read answered from Python costs two copies (guest memory -> daemon buffer
 * -> reader).  This module answers FUSE_READ without Python and, where the
 * guest's RAM is a shared file (memfd, hugetlbfs, a file), without the first
 * copy: the reply is spliced from that file into a pipe and from the pipe
 * into /dev/fuse, so the only copy is the kernel's into the reader's pages.
 *
 * How it sits between the kernel and pyfuse3 (a proxy on the FUSE device):
 *
 *      kernel /dev/fuse  <-- dev_fd -->  [device thread]  --FUSE_READ of a registered fh--> reply itself
 *                                            | every other request (and READ of unknown fh)
 *                                            v
 *      pyfuse3/libfuse   <-- app_fd (SOCK_SEQPACKET) -->  [reply thread] --> replies, notifications to dev_fd
 *
 * pyfuse3 keeps serving everything else (INIT, LOOKUP, GETATTR, OPEN,
 * RELEASE, ...) unchanged: its descriptor number now names one end of a
 * SOCK_SEQPACKET socket pair, which keeps one message per request and per
 * reply, as the FUSE device does.  At open() the Python side registers the
 * handle's layout -- the file's size, its literal prefix (ELF headers and
 * notes) and its memory extents (file offset, length, fd, fd offset) -- and
 * unregisters it at release.  Anything not covered by the prefix or an
 * extent reads as zeros, exactly like vmcorefs.core.layout.SparseFile.
 *
 * Private RAM (QEMU's anonymous memory, EXT_PROCMEM) is read with
 * process_vm_readv (one copy; /proc/PID/mem as the fallback), except pages
 * that hold no data according to /proc/PID/pagemap, which are spliced as
 * zeros without touching QEMU.
 *
 * Reading guest memory follows vmcorefs.qemu.memory.read_into: pages that
 * cannot be read become zeros; bytes past the end of a backing file become
 * zeros; an error that means QEMU has exited (ESRCH, or end of file on
 * /proc/PID/mem with the process gone) fails the read with EIO and reports
 * 'G' on the event descriptor.  When the kernel ends the connection
 * (unmount, abort) the device thread reports 'U' and stops.
 *
 * The struct and constant names are those of <linux/fuse.h>.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE 4096u
/* The largest read the kernel sends: FUSE_MAX_MAX_PAGES (256) pages. */
#define MAX_REPLY (256u * PAGE)
/* Requests may be as large as max_write plus headers (libfuse: 1 MiB). */
#define REQ_BUF (MAX_REPLY + 64u * 1024u)
#define PIPE_WANT (2u * MAX_REPLY)

/* Zeros to splice or copy from: page-aligned, never written. */
static unsigned char zeros[MAX_REPLY] __attribute__((aligned(4096)));

/*
 * Where the bytes of an extent come from: vmcorefs.core.layout.ExtentKind,
 * same numbers.  MEMORY (a guest-physical address) exists only in layouts
 * before they are resolved and never reaches this module.
 */
enum extent_kind { EXT_PREFIX = 0, EXT_ZERO = 1, EXT_MEMORY = 2, EXT_SHARED = 3, EXT_PROCMEM = 4 };

/*
 * vmcorefs.core.layout.Extent, same field order: length bytes at file offset
 * offset come from src -- an offset into the prefix (EXT_PREFIX), into fd
 * (EXT_SHARED), or QEMU's host-virtual address, fd being /proc/PID/mem
 * (EXT_PROCMEM).  A registered layout's memory extents and the pieces of
 * one reply are both extents.
 */
struct extent {
    uint64_t offset;
    uint64_t length;
    enum extent_kind kind;
    uint64_t src;
    int fd;
};

typedef struct {
    atomic_int refs;
    uint64_t fh;
    uint64_t size;
    unsigned char *prefix;
    size_t prefix_len;
    struct extent *ext;
    size_t n;
} layout;

typedef struct {
    PyObject_HEAD
    int dev_fd, app_fd, event_fd;
    int stop_rd, stop_wr;
    pid_t pid;
    pthread_t dev_thread, app_thread;
    int started;
    pthread_mutex_t lock;
    layout **tab;
    size_t ntab, captab;
    atomic_int gone;
    atomic_int no_vm_readv;
    atomic_int warned_kind;
    /* Device-thread state. */
    int pipe_r, pipe_w;
    size_t pipe_slots;
    int zero_fd;    /* a memfd hole of MAX_REPLY bytes */
    int pagemap_fd; /* /proc/PID/pagemap: which private pages QEMU ever touched */
    uint64_t zero_pfn, huge_zero_pfn; /* the kernel's zero pages (0: unknown) */
    unsigned char *rbuf, *cbuf;
    atomic_ullong init_unique; /* FUSE_INIT's unique, to adjust libfuse's reply */
    /* Counters (read with stats()). */
    atomic_ullong n_reads, n_spliced, n_copied, n_forwarded, n_replies, bytes;
} Engine;

static void layout_unref(layout *l)
{
    if (l && atomic_fetch_sub(&l->refs, 1) == 1) {
        free(l->prefix);
        free(l->ext);
        free(l);
    }
}

static void emit(Engine *e, char code)
{
    ssize_t r;
    do {
        r = write(e->event_fd, &code, 1);
    } while (r < 0 && errno == EINTR);
}

/* A piece of a kind this engine does not serve (cannot happen: register checks): zeros, said once. */
static void warn_kind(Engine *e, enum extent_kind kind)
{
    if (kind != EXT_ZERO && !atomic_exchange(&e->warned_kind, 1))
        fprintf(stderr, "vmcorefs._readpath: extent kind %d read as zeros\n", (int)kind);
}

static layout *lookup_ref(Engine *e, uint64_t fh)
{
    layout *found = NULL;
    pthread_mutex_lock(&e->lock);
    for (size_t i = 0; i < e->ntab; i++) {
        if (e->tab[i]->fh == fh) {
            found = e->tab[i];
            atomic_fetch_add(&found->refs, 1);
            break;
        }
    }
    pthread_mutex_unlock(&e->lock);
    return found;
}

static int write_all_dev(Engine *e, const struct iovec *iov, int n)
{
    ssize_t r;
    do {
        r = writev(e->dev_fd, iov, n);
    } while (r < 0 && errno == EINTR);
    /* ENOENT: the request was interrupted and is gone; nothing to do. */
    return r < 0 ? -errno : 0;
}

static void reply_err(Engine *e, uint64_t unique, int err)
{
    struct fuse_out_header oh = {.len = sizeof oh, .error = -err, .unique = unique};
    struct iovec iov = {&oh, sizeof oh};
    write_all_dev(e, &iov, 1);
}

static int qemu_alive(pid_t pid)
{
    if (pid <= 0)
        return 1;
    return kill(pid, 0) == 0 || errno == EPERM;
}

/*
 * The piece of a reply starting at file offset pos, at most end - pos long:
 * prefix bytes (src: offset in the prefix), zeros, or part of one memory
 * extent (src advanced to pos).
 */
static struct extent piece_at(const layout *l, uint64_t pos, uint64_t end)
{
    struct extent p = {.offset = pos, .length = end - pos, .kind = EXT_ZERO, .src = 0, .fd = -1};
    if (pos < l->prefix_len) {
        p.kind = EXT_PREFIX;
        p.src = pos;
        if (p.length > l->prefix_len - pos)
            p.length = l->prefix_len - pos;
        return p;
    }
    /* Last extent with offset <= pos. */
    size_t lo = 0, hi = l->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (l->ext[mid].offset <= pos)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo > 0) {
        const struct extent *x = &l->ext[lo - 1];
        if (pos - x->offset < x->length) {
            p.kind = x->kind;
            p.fd = x->fd;
            p.src = x->src + (pos - x->offset);
            if (p.length > x->length - (pos - x->offset))
                p.length = x->length - (pos - x->offset);
            return p;
        }
    }
    if (lo < l->n && l->ext[lo].offset < end)
        p.length = l->ext[lo].offset - pos;
    return p;
}

/*
 * One read of QEMU's memory.  /proc/PID/mem (EXT_PROCMEM) is read with
 * process_vm_readv at the same host address when the kernel allows it:
 * one copy and no per-page bounce buffer, about twice as fast as pread of
 * /proc/PID/mem, with the same access check (ptrace) and the same effect
 * on QEMU (a read fault maps the zero page, allocates nothing).
 */
static ssize_t read_once(Engine *e, const struct extent *x, uint64_t src, unsigned char *buf, uint64_t len)
{
    if (x->kind == EXT_PROCMEM && e->pid > 0 && !atomic_load(&e->no_vm_readv)) {
        struct iovec local = {buf, len}, remote = {(void *)(uintptr_t)src, len};
        ssize_t n = process_vm_readv(e->pid, &local, 1, &remote, 1, 0);
        if (n >= 0 || (errno != ENOSYS && errno != EPERM))
            return n;
        atomic_store(&e->no_vm_readv, 1); /* e.g. a seccomp filter: /proc/PID/mem from now on */
    }
    return pread(x->fd, buf, len, (off_t)src);
}

/* Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst). */
#define PM_PRESENT (1ull << 63)
#define PM_SWAPPED (1ull << 62)
#define PM_MAX_PAGES (MAX_REPLY / PAGE + 1)
#define PM_PFN(e) ((e) & ((1ull << 55) - 1))
#define HUGE (2u << 20)

/*
 * A page that reads as zeros without holding data: never touched (neither
 * present nor swapped), or mapped to the kernel's zero page (or huge zero
 * page) by an earlier read fault.  PFNs are visible with CAP_SYS_ADMIN only;
 * without it only the first case is recognised.
 */
static int zero_entry(const Engine *e, uint64_t ent)
{
    if (!(ent & (PM_PRESENT | PM_SWAPPED)))
        return 1;
    if (!(ent & PM_PRESENT) || PM_PFN(ent) == 0)
        return 0;
    uint64_t pfn = PM_PFN(ent);
    return (e->zero_pfn && pfn == e->zero_pfn)
        || (e->huge_zero_pfn && pfn >= e->huge_zero_pfn && pfn < e->huge_zero_pfn + HUGE / PAGE);
}

/* The PFN our own read fault maps at an untouched anonymous address (0: unknown). */
static uint64_t own_zero_pfn(size_t size, int huge)
{
    size_t len = size * 2;
    unsigned char *m = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 0;
    unsigned char *p = (unsigned char *)(((uintptr_t)m + size - 1) / size * size);
    uint64_t pfn = 0;
    if (!huge || madvise(p, size, MADV_HUGEPAGE) == 0) {
        volatile unsigned char c = *p; /* read fault: maps the (huge) zero page */
        (void)c;
        int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        uint64_t ent = 0;
        if (fd >= 0 && pread(fd, &ent, sizeof ent, (off_t)((uintptr_t)p / PAGE * sizeof ent)) == sizeof ent
            && (ent & PM_PRESENT))
            pfn = PM_PFN(ent);
        if (fd >= 0)
            close(fd);
    }
    munmap(m, len);
    return pfn;
}

/*
 * The pagemap entries of the pages of QEMU's [src, src+len), len <= MAX_REPLY;
 * the number of pages, or 0 when unknown (no pagemap, QEMU gone).
 */
static uint64_t pagemap_of(Engine *e, uint64_t src, uint64_t len, uint64_t *ents)
{
    if (e->pagemap_fd < 0 || len == 0 || len > MAX_REPLY)
        return 0;
    uint64_t first = src / PAGE, n = (src + len - 1) / PAGE - first + 1;
    ssize_t r = pread(e->pagemap_fd, ents, n * sizeof *ents, (off_t)(first * sizeof *ents));
    return r == (ssize_t)(n * sizeof *ents) ? n : 0;
}

/*
 * Private RAM that holds no data -- never touched, or only read and mapped
 * to the zero page -- is zeros: answering that from the pagemap, rather
 * than reading it, costs no copy and does not make the kernel map the zero
 * page into QEMU (which grows QEMU's page tables by 2 MiB per GiB read).
 */
static int untouched(Engine *e, uint64_t src, uint64_t len)
{
    uint64_t ents[PM_MAX_PAGES];
    uint64_t n = pagemap_of(e, src, len, ents);
    if (n == 0)
        return 0;
    for (uint64_t i = 0; i < n; i++)
        if (!zero_entry(e, ents[i]))
            return 0;
    return 1;
}

static int read_mem_plain(Engine *e, const struct extent *x, uint64_t src, unsigned char *buf, uint64_t len);

/* read_into() for /proc/PID/mem: untouched pages as zeros, the rest read. */
static int read_procmem(Engine *e, const struct extent *x, uint64_t src, unsigned char *buf, uint64_t len)
{
    uint64_t ents[PM_MAX_PAGES];
    uint64_t n = pagemap_of(e, src, len, ents);
    if (n == 0)
        return read_mem_plain(e, x, src, buf, len);
    uint64_t first = src / PAGE, pos = 0, i = 0;
    while (pos < len) {
        int touched = !zero_entry(e, ents[i]);
        while (i < n && !zero_entry(e, ents[i]) == touched)
            i++;
        uint64_t end = (first + i) * PAGE - src;
        if (end > len)
            end = len;
        if (!touched)
            memset(buf + pos, 0, end - pos);
        else if (read_mem_plain(e, x, src + pos, buf + pos, end - pos) < 0)
            return -1;
        pos = end;
    }
    return 0;
}

static int read_mem(Engine *e, const struct extent *x, uint64_t src, unsigned char *buf, uint64_t len)
{
    if (x->kind == EXT_PROCMEM)
        return read_procmem(e, x, src, buf, len);
    return read_mem_plain(e, x, src, buf, len);
}

/* read_into(): fill buf from fd at src; 0, or -1 when QEMU has exited. */
static int read_mem_plain(Engine *e, const struct extent *x, uint64_t src, unsigned char *buf, uint64_t len)
{
    uint64_t pos = 0;
    while (pos < len) {
        ssize_t n = read_once(e, x, src + pos, buf + pos, len - pos);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == ESRCH || !qemu_alive(e->pid))
                return -1;
            /* Unreadable page (EIO/EFAULT for a page QEMU unmapped): zeros. */
            uint64_t next = ((src + pos) / PAGE + 1) * PAGE - src;
            if (next > len)
                next = len;
            memset(buf + pos, 0, next - pos);
            pos = next;
            continue;
        }
        if (n == 0) {
            if (x->kind == EXT_PROCMEM && !qemu_alive(e->pid))
                return -1;
            memset(buf + pos, 0, len - pos);
            return 0;
        }
        pos += (uint64_t)n;
    }
    return 0;
}

static int copy_reply(Engine *e, struct fuse_out_header *oh, const layout *l, uint64_t off, uint64_t len)
{
    uint64_t pos = off, end = off + len;
    while (pos < end) {
        struct extent p = piece_at(l, pos, end);
        unsigned char *dst = e->cbuf + (pos - off);
        switch (p.kind) {
        case EXT_PREFIX:
            memcpy(dst, l->prefix + p.src, p.length);
            break;
        case EXT_SHARED:
        case EXT_PROCMEM:
            if (read_mem(e, &p, p.src, dst, p.length) < 0)
                return -1;
            break;
        case EXT_ZERO:
        default:
            warn_kind(e, p.kind);
            memset(dst, 0, p.length);
            break;
        }
        pos += p.length;
    }
    struct iovec iov[2] = {{oh, sizeof *oh}, {e->cbuf, len}};
    write_all_dev(e, iov, 2);
    atomic_fetch_add(&e->n_copied, 1);
    return 0;
}

static int pipe_open(Engine *e)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
        return -1;
    int size = fcntl(p[1], F_SETPIPE_SZ, PIPE_WANT);
    if (size < 0)
        size = fcntl(p[1], F_SETPIPE_SZ, 1 << 20); /* the unprivileged maximum by default */
    if (size < 0)
        size = fcntl(p[1], F_GETPIPE_SZ);
    e->pipe_r = p[0];
    e->pipe_w = p[1];
    e->pipe_slots = size > 0 ? (size_t)size / PAGE : 0;
    return 0;
}

static void pipe_reset(Engine *e)
{
    close(e->pipe_r);
    close(e->pipe_w);
    e->pipe_r = e->pipe_w = -1;
    e->pipe_slots = 0;
    pipe_open(e);
}

static uint64_t pages_spanned(uint64_t addr, uint64_t len)
{
    return len ? (addr + len - 1) / PAGE - addr / PAGE + 1 : 0;
}

static int vmsplice_all(Engine *e, const void *base, uint64_t len)
{
    struct iovec iov = {(void *)base, len};
    while (iov.iov_len) {
        ssize_t n = vmsplice(e->pipe_w, &iov, 1, SPLICE_F_NONBLOCK);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        iov.iov_base = (char *)iov.iov_base + n;
        iov.iov_len -= (size_t)n;
    }
    return 0;
}

/*
 * Zeros: spliced from a memfd that is one never-written hole, so the pipe
 * gets references to the kernel's zero page (no page pinning, nothing
 * allocated); vmsplice of a zero buffer if that memfd is unavailable.
 */
static int splice_zeros(Engine *e, uint64_t len)
{
    while (len) {
        uint64_t n = len < MAX_REPLY ? len : MAX_REPLY;
        if (e->zero_fd >= 0) {
            loff_t off = 0;
            while (n) {
                ssize_t k = splice(e->zero_fd, &off, e->pipe_w, NULL, n, SPLICE_F_NONBLOCK);
                if (k < 0 && errno == EINTR)
                    continue;
                if (k <= 0)
                    return -1;
                n -= (uint64_t)k;
                len -= (uint64_t)k;
            }
            continue;
        }
        if (vmsplice_all(e, zeros, n) < 0)
            return -1;
        len -= n;
    }
    return 0;
}

/*
 * Reply by splicing: header and literal bytes with vmsplice, shared-file
 * memory with splice (page references, no copy), then the whole message
 * from the pipe into /dev/fuse in one splice.  Returns 1 when replied,
 * 0 when the reply must be copied instead (nothing was sent).
 */
static int splice_reply(Engine *e, struct fuse_out_header *oh, const layout *l, uint64_t off, uint64_t len)
{
    if (e->pipe_w < 0)
        return 0;
    /* Every piece must be spliceable and the message must fit the pipe. */
    uint64_t slots = 1, pos = off, end = off + len;
    while (pos < end) {
        struct extent p = piece_at(l, pos, end);
        switch (p.kind) {
        case EXT_PREFIX:
            slots += pages_spanned((uintptr_t)(l->prefix + p.src), p.length);
            break;
        case EXT_SHARED:
            slots += pages_spanned(p.src, p.length);
            break;
        case EXT_PROCMEM:
            if (!untouched(e, p.src, p.length))
                return 0; /* private RAM with data: copied */
            slots += pages_spanned(0, p.length);
            break;
        case EXT_ZERO:
        default:
            slots += pages_spanned(0, p.length); /* from the page-aligned zeros */
            break;
        }
        pos += p.length;
    }
    if (slots > e->pipe_slots)
        return 0;
    if (vmsplice_all(e, oh, sizeof *oh) < 0)
        goto fallback;
    for (pos = off; pos < end;) {
        struct extent p = piece_at(l, pos, end);
        switch (p.kind) {
        case EXT_PREFIX:
            if (vmsplice_all(e, l->prefix + p.src, p.length) < 0)
                goto fallback;
            break;
        case EXT_SHARED: {
            loff_t src = (loff_t)p.src;
            uint64_t left = p.length;
            while (left) {
                ssize_t n = splice(p.fd, &src, e->pipe_w, NULL, left, SPLICE_F_NONBLOCK);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n < 0)
                    goto fallback; /* e.g. EINVAL: this file cannot splice */
                if (n == 0) {      /* past the end of the backing file: zeros */
                    if (splice_zeros(e, left) < 0)
                        goto fallback;
                    break;
                }
                left -= (uint64_t)n;
            }
            break;
        }
        case EXT_PROCMEM: /* untouched, checked above */
        case EXT_ZERO:
        default:
            warn_kind(e, p.kind);
            if (splice_zeros(e, p.length) < 0)
                goto fallback;
            break;
        }
        pos += p.length;
    }
    for (;;) {
        ssize_t n = splice(e->pipe_r, NULL, e->dev_fd, NULL, oh->len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)oh->len)
            pipe_reset(e); /* e.g. ENOENT: the request was interrupted; drop what is left */
        break;
    }
    atomic_fetch_add(&e->n_spliced, 1);
    return 1;
fallback:
    pipe_reset(e);
    return 0;
}

static void serve_read(Engine *e, uint64_t unique, const layout *l, uint64_t off, uint32_t size)
{
    atomic_fetch_add(&e->n_reads, 1);
    if (atomic_load(&e->gone)) {
        reply_err(e, unique, EIO);
        return;
    }
    uint64_t len = off >= l->size ? 0 : l->size - off;
    if (len > size)
        len = size;
    if (len > MAX_REPLY)
        len = MAX_REPLY; /* the kernel never asks for more; a short read is still correct */
    struct fuse_out_header oh = {.len = (uint32_t)(sizeof oh + len), .error = 0, .unique = unique};
    if (len == 0) {
        struct iovec iov = {&oh, sizeof oh};
        write_all_dev(e, &iov, 1);
        return;
    }
    atomic_fetch_add(&e->bytes, len);
    if (splice_reply(e, &oh, l, off, len))
        return;
    if (copy_reply(e, &oh, l, off, len) < 0) {
        if (!atomic_exchange(&e->gone, 1))
            emit(e, 'G');
        reply_err(e, unique, EIO);
    }
}

/* The zeros memfd: sized, sealed, and kept only as a read-only descriptor. */
static int open_zeros(void)
{
    int fd = memfd_create("vmcorefs-zeros", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -1;
    int ro = -1;
    if (ftruncate(fd, MAX_REPLY) == 0
        && fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) == 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        ro = open(path, O_RDONLY | O_CLOEXEC);
    }
    close(fd);
    return ro;
}

static int wait_readable(int fd, int stop_fd)
{
    struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    for (;;) {
        int r = poll(p, 2, -1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 || p[1].revents)
            return -1;
        return 0;
    }
}

/* Requests from the kernel: READs of registered handles here, the rest to pyfuse3. */
static void *dev_main(void *arg)
{
    Engine *e = arg;
    for (;;) {
        ssize_t n = read(e->dev_fd, e->rbuf, REQ_BUF);
        if (n < 0) {
            if (errno == EAGAIN) {
                if (wait_readable(e->dev_fd, e->stop_rd) < 0)
                    return NULL;
                continue;
            }
            if (errno == EINTR || errno == ENOENT)
                continue;
            emit(e, 'U'); /* ENODEV: unmounted or aborted */
            return NULL;
        }
        if ((size_t)n < sizeof(struct fuse_in_header))
            continue;
        struct fuse_in_header *h = (struct fuse_in_header *)e->rbuf;
        if (h->opcode == FUSE_INIT)
            atomic_store(&e->init_unique, h->unique);
        if (h->opcode == FUSE_READ && (size_t)n >= sizeof *h + sizeof(struct fuse_read_in)) {
            struct fuse_read_in *r = (struct fuse_read_in *)(h + 1);
            layout *l = lookup_ref(e, r->fh);
            if (l) {
                serve_read(e, h->unique, l, r->offset, r->size);
                layout_unref(l);
                continue;
            }
        }
        ssize_t w;
        do {
            w = send(e->app_fd, e->rbuf, (size_t)n, MSG_NOSIGNAL);
        } while (w < 0 && errno == EINTR);
        if (w < 0 && h->opcode != FUSE_FORGET && h->opcode != FUSE_BATCH_FORGET
            && h->opcode != FUSE_INTERRUPT)
            reply_err(e, h->unique, EIO); /* pyfuse3 is gone: do not leave the caller hanging */
        atomic_fetch_add(&e->n_forwarded, 1);
    }
}

/*
 * A spliced reply must fit the pipe whole: header + up to max_pages pages.
 * Without CAP_SYS_RESOURCE a pipe holds at most pipe-max-size (1 MiB, 256
 * pages), one page short for a 1 MiB read; then cap the requests' size
 * (FUSE_INIT's max_pages) so that every read can be spliced.
 */
static void limit_max_pages(Engine *e, struct fuse_init_out *out)
{
    if (!(out->flags & FUSE_MAX_PAGES) || e->pipe_slots < 2)
        return;
    uint64_t cap = e->pipe_slots - 1;
    if (out->max_pages > cap)
        out->max_pages = (uint16_t)cap;
}

/* Replies and notifications from pyfuse3, one message each, to the kernel. */
static void *app_main(void *arg)
{
    Engine *e = arg;
    size_t cap = MAX_REPLY + 64u * 1024u;
    unsigned char *buf = malloc(cap);
    if (!buf)
        return NULL;
    for (;;) {
        ssize_t n = recv(e->app_fd, buf, cap, MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0) {
            if (errno == EAGAIN) {
                if (wait_readable(e->app_fd, e->stop_rd) < 0)
                    break;
                continue;
            }
            if (errno == EINTR)
                continue;
            break;
        }
        if (n == 0)
            break; /* pyfuse3 closed its end */
        if ((size_t)n > cap)
            continue; /* cannot happen: replies are at most one read's size */
        struct fuse_out_header *oh = (struct fuse_out_header *)buf;
        if ((size_t)n >= sizeof *oh + offsetof(struct fuse_init_out, max_pages) + sizeof(uint16_t)
            && oh->error == 0 && oh->unique && oh->unique == atomic_load(&e->init_unique))
            limit_max_pages(e, (struct fuse_init_out *)(oh + 1));
        struct iovec iov = {buf, (size_t)n};
        write_all_dev(e, &iov, 1);
        atomic_fetch_add(&e->n_replies, 1);
    }
    free(buf);
    return NULL;
}

/* ---- Python type ------------------------------------------------------ */

static int Engine_init(Engine *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"dev_fd", "app_fd", "event_fd", "pid", NULL};
    int pid = 0;
    self->dev_fd = self->app_fd = self->event_fd = -1;
    self->stop_rd = self->stop_wr = self->pipe_r = self->pipe_w = self->zero_fd = self->pagemap_fd = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iii|i", kwlist, &self->dev_fd, &self->app_fd,
                                     &self->event_fd, &pid))
        return -1;
    self->pid = pid;
    pthread_mutex_init(&self->lock, NULL);
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->stop_rd = p[0];
    self->stop_wr = p[1];
    self->rbuf = malloc(REQ_BUF);
    self->cbuf = malloc(MAX_REPLY);
    if (!self->rbuf || !self->cbuf) {
        PyErr_NoMemory();
        return -1;
    }
    pipe_open(self);
    self->zero_fd = open_zeros();
    if (pid > 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
        self->pagemap_fd = open(path, O_RDONLY | O_CLOEXEC); /* -1: read every page */
        self->zero_pfn = own_zero_pfn(PAGE, 0);
        uint64_t huge = own_zero_pfn(HUGE, 1);
        if (huge != self->zero_pfn)
            self->huge_zero_pfn = huge;
    }
    int fl = fcntl(self->dev_fd, F_GETFL);
    if (fl < 0 || fcntl(self->dev_fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *Engine_start(Engine *self, PyObject *unused)
{
    if (self->started)
        Py_RETURN_NONE;
    if (pthread_create(&self->dev_thread, NULL, dev_main, self) != 0) {
        PyErr_SetString(PyExc_OSError, "cannot start the read-path thread");
        return NULL;
    }
    if (pthread_create(&self->app_thread, NULL, app_main, self) != 0) {
        PyErr_SetString(PyExc_OSError, "cannot start the reply thread");
        return NULL; /* dealloc stops the first thread */
    }
    self->started = 2;
    Py_RETURN_NONE;
}

static void engine_stop(Engine *self)
{
    if (self->stop_wr >= 0) {
        char c = 'x';
        if (write(self->stop_wr, &c, 1) < 0) {
            /* nothing more to do: the threads also stop on their own descriptors */
        }
    }
    if (self->started) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(self->dev_thread, NULL);
        if (self->started == 2)
            pthread_join(self->app_thread, NULL);
        Py_END_ALLOW_THREADS
        self->started = 0;
    }
}

static PyObject *Engine_stop(Engine *self, PyObject *unused)
{
    engine_stop(self);
    Py_RETURN_NONE;
}

static PyObject *Engine_register(Engine *self, PyObject *args)
{
    unsigned long long fh, size;
    Py_buffer prefix;
    PyObject *extents;
    if (!PyArg_ParseTuple(args, "KKy*O", &fh, &size, &prefix, &extents))
        return NULL;
    PyObject *seq = PySequence_Fast(extents, "extents must be a sequence");
    if (!seq) {
        PyBuffer_Release(&prefix);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    layout *l = calloc(1, sizeof *l);
    if (l) {
        l->ext = calloc(n ? (size_t)n : 1, sizeof *l->ext);
        l->prefix = malloc(prefix.len ? (size_t)prefix.len : 1);
    }
    if (!l || !l->ext || !l->prefix) {
        layout_unref(l);
        Py_DECREF(seq);
        PyBuffer_Release(&prefix);
        return PyErr_NoMemory();
    }
    atomic_init(&l->refs, 1);
    l->fh = fh;
    l->size = size;
    l->prefix_len = (size_t)prefix.len;
    memcpy(l->prefix, prefix.buf, (size_t)prefix.len);
    PyBuffer_Release(&prefix);
    uint64_t last_end = l->prefix_len;
    for (Py_ssize_t i = 0; i < n; i++) {
        struct extent *x = &l->ext[i];
        unsigned long long off, len, src;
        int fd, kind;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKiKi", &off, &len, &kind, &src, &fd))
            goto bad;
        if (kind != EXT_SHARED && kind != EXT_PROCMEM) {
            PyErr_Format(PyExc_ValueError, "extent %zd (offset %#llx): kind %d is not EXT_SHARED (%d) or"
                         " EXT_PROCMEM (%d)", i, off, kind, EXT_SHARED, EXT_PROCMEM);
            goto bad;
        }
        if (off < last_end || len == 0 || off + len > size || off + len < off) {
            PyErr_Format(PyExc_ValueError, "extent %zd (offset %#llx, length %#llx) is empty, unsorted,"
                         " overlapping or beyond the file", i, off, len);
            goto bad;
        }
        x->offset = off;
        x->length = len;
        x->fd = fd;
        x->src = src;
        x->kind = kind;
        last_end = off + len;
    }
    l->n = (size_t)n;
    Py_DECREF(seq);
    pthread_mutex_lock(&self->lock);
    if (self->ntab == self->captab) {
        size_t cap = self->captab ? 2 * self->captab : 16;
        layout **tab = realloc(self->tab, cap * sizeof *tab);
        if (!tab) {
            pthread_mutex_unlock(&self->lock);
            layout_unref(l);
            return PyErr_NoMemory();
        }
        self->tab = tab;
        self->captab = cap;
    }
    for (size_t i = 0; i < self->ntab; i++) {
        if (self->tab[i]->fh == fh) { /* replace */
            layout_unref(self->tab[i]);
            self->tab[i] = l;
            pthread_mutex_unlock(&self->lock);
            Py_RETURN_NONE;
        }
    }
    self->tab[self->ntab++] = l;
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
bad:
    Py_DECREF(seq);
    layout_unref(l);
    return NULL;
}

static PyObject *Engine_unregister(Engine *self, PyObject *arg)
{
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    layout *drop = NULL;
    pthread_mutex_lock(&self->lock);
    for (size_t i = 0; i < self->ntab; i++) {
        if (self->tab[i]->fh == fh) {
            drop = self->tab[i];
            self->tab[i] = self->tab[--self->ntab];
            break;
        }
    }
    pthread_mutex_unlock(&self->lock);
    layout_unref(drop);
    return PyBool_FromLong(drop != NULL);
}

static PyObject *Engine_set_gone(Engine *self, PyObject *unused)
{
    atomic_store(&self->gone, 1);
    Py_RETURN_NONE;
}

static PyObject *Engine_stats(Engine *self, PyObject *unused)
{
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:n,s:i,s:i}",
                         "reads", (unsigned long long)atomic_load(&self->n_reads),
                         "spliced", (unsigned long long)atomic_load(&self->n_spliced),
                         "copied", (unsigned long long)atomic_load(&self->n_copied),
                         "bytes", (unsigned long long)atomic_load(&self->bytes),
                         "forwarded", (unsigned long long)atomic_load(&self->n_forwarded),
                         "replies", (unsigned long long)atomic_load(&self->n_replies),
                         "pipe_bytes", (Py_ssize_t)(self->pipe_slots * PAGE),
                         "handles", (Py_ssize_t)self->ntab,
                         "pagemap", self->pagemap_fd >= 0,
                         "zero_pfn_known", self->zero_pfn != 0);
}

static void Engine_dealloc(Engine *self)
{
    engine_stop(self);
    for (size_t i = 0; i < self->ntab; i++)
        layout_unref(self->tab[i]);
    free(self->tab);
    free(self->rbuf);
    free(self->cbuf);
    int fds[] = {self->stop_rd, self->stop_wr, self->pipe_r, self->pipe_w, self->zero_fd, self->pagemap_fd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "Start the device and reply threads."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS, "Stop both threads and wait for them."},
    {"register", (PyCFunction)Engine_register, METH_VARARGS,
     "register(fh, size, prefix, extents): serve READs of fh natively.\n"
     "extents: sorted (offset, length, kind, src, fd) like vmcorefs.core.layout.Extent; kind EXT_SHARED\n"
     "(src: offset in fd, spliced) or EXT_PROCMEM (src: QEMU's address, fd: /proc/PID/mem)."},
    {"unregister", (PyCFunction)Engine_unregister, METH_O, "Forget fh; True if it was registered."},
    {"set_gone", (PyCFunction)Engine_set_gone, METH_NOARGS, "QEMU has exited: fail every read with EIO."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Counters of the native read path."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vmcorefs._readpath.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Native FUSE_READ server between /dev/fuse (dev_fd) and pyfuse3 (app_fd).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmcorefs._readpath",
    "The native FUSE_READ path (see the C source's header comment).", -1, NULL,
};

PyMODINIT_FUNC PyInit__readpath(void)
{
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "EXT_PREFIX", EXT_PREFIX);
    PyModule_AddIntConstant(m, "EXT_ZERO", EXT_ZERO);
    PyModule_AddIntConstant(m, "EXT_MEMORY", EXT_MEMORY);
    PyModule_AddIntConstant(m, "EXT_SHARED", EXT_SHARED);
    PyModule_AddIntConstant(m, "EXT_PROCMEM", EXT_PROCMEM);
    PyModule_AddIntConstant(m, "MAX_REPLY", MAX_REPLY);
    return m;
}
