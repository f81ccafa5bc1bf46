/*
 * vmcorefs._readpath -- the native READ path of the FUSE adapter, and the
 * copy of vmcorefs dump (section 7), which reads guest memory the same way.
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
 * notes) and its memory extents (vmcorefs.core.layout.Extent: offset,
 * length, kind, src, fd) -- and unregisters it at release.  Anything not
 * covered by the prefix or an extent reads as zeros, exactly like
 * vmcorefs.core.layout.SparseFile.
 *
 * Private RAM (QEMU's anonymous memory, EXT_PROCMEM) is read with
 * process_vm_readv (one copy; pread of /proc/PID/mem when the kernel or a
 * seccomp filter refuses it), except pages that hold no data according to
 * /proc/PID/pagemap, which are spliced as zeros without touching QEMU.
 *
 * Reading guest memory follows vmcorefs.qemu.memory.read_into: pages that
 * cannot be read become zeros; bytes past the end of a backing file become
 * zeros; an error that means QEMU has exited (ESRCH, or end of file on
 * /proc/PID/mem with the process gone) fails the read with EIO and reports
 * 'G' on the event descriptor.  A handle registered with a QEMU of its own
 * (mount --all serves several from one engine) reads that process's memory
 * and pagemap; once it has exited only that handle's reads fail (no 'G').
 * When the kernel ends the connection
 * (unmount, abort) the device thread reports 'U' and stops.  libfuse's
 * answer to FUSE_INIT is reported as 'R' (accepted) or 'I' (refused).
 *
 * The file is laid out like Linux's fs/proc/kcore.c, one concern per section:
 *
 *   1. extents and layouts      what a registered handle's bytes are
 *   2. the engine and its handle table
 *   3. guest memory             process_vm_readv, /proc/PID/mem, pagemap zero detection
 *   4. replies                  copied, or spliced (pipe plumbing)
 *   5. the FUSE proxy           one request, one reply; the two threads
 *   6. engine life cycle        open, start (STOPPED -> DEVICE_THREAD -> BOTH), stop, close
 *   7. the dump copier          vmcorefs dump's copy: runs of guest memory into a sparse file
 *   8. the CPython binding      (left out with -DREADPATH_NO_PYTHON: tests/fuzz builds
 *                                sections 1-7 alone)
 *
 * The struct and constant names are those of <linux/fuse.h>.
 */
#define _GNU_SOURCE
#ifndef READPATH_NO_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE 4096u
/* The largest read the kernel sends: FUSE_MAX_MAX_PAGES (256) pages. */
#define MAX_REPLY (256u * PAGE)
/* The largest message either way: a request of max_write plus headers
 * (libfuse: 1 MiB), or a read reply (header + MAX_REPLY). */
#define REQ_BUF (MAX_REPLY + 64u * 1024u)
#define PIPE_WANT (2u * MAX_REPLY)
/* Natively answered requests remembered for FUSE_INTERRUPT (see handle_interrupt). */
#define ANSWERED_RING 64u

/* Zeros to splice or copy from: page-aligned, never written. */
static unsigned char zeros[MAX_REPLY] __attribute__((aligned(4096)));

/* ==== 1. Extents and layouts ========================================== */

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

/*
 * The QEMU process whose memory a layout's EXT_PROCMEM extents name: pid for
 * process_vm_readv and liveness (0: none), its /proc/PID/pagemap (-1: none).
 */
struct qemu {
    pid_t pid;
    int pagemap_fd;
};

/* One registered handle: shared by the table and the reads in flight. */
struct layout {
    atomic_int refs;
    uint64_t fh;
    uint64_t size;
    unsigned char *prefix;
    size_t prefix_len;
    struct extent *ext;
    size_t n;
    /* The engine's QEMU, or (mount --all: one engine, several QEMUs) the
     * handle's own, whose pagemap descriptor is then the layout's. */
    struct qemu q;
    int own_pagemap;
};

static void layout_unref(struct layout *l)
{
    if (l && atomic_fetch_sub(&l->refs, 1) == 1) {
        if (l->own_pagemap && l->q.pagemap_fd >= 0)
            close(l->q.pagemap_fd);
        free(l->prefix);
        free(l->ext);
        free(l);
    }
}

/*
 * Why extents x[0..n) cannot be a layout of a file of size bytes after a
 * prefix_len-byte prefix (NULL when they can); *bad is the culprit.  Every
 * byte an extent names must be addressable: an offset into fd that fits
 * off_t, an address range that does not wrap.
 */
static const char *layout_check(const struct extent *x, size_t n, uint64_t prefix_len, uint64_t size,
                                size_t *bad)
{
    uint64_t last_end = prefix_len;
    if (prefix_len > size) {
        *bad = 0;
        return "the prefix is longer than the file";
    }
    for (size_t i = 0; i < n; i++) {
        *bad = i;
        switch (x[i].kind) {
        case EXT_SHARED:
            if (x[i].src > (uint64_t)INT64_MAX - x[i].length)
                return "source range is beyond any file offset";
            break;
        case EXT_PROCMEM:
            if (x[i].src + x[i].length < x[i].src)
                return "source range wraps around the address space";
            break;
        default:
            return "kind is not EXT_SHARED or EXT_PROCMEM";
        }
        if (x[i].length == 0)
            return "empty";
        if (x[i].offset < last_end)
            return "unsorted, or overlapping the prefix or the previous extent";
        if (x[i].offset + x[i].length > size || x[i].offset + x[i].length < x[i].offset)
            return "beyond the end of the file";
        last_end = x[i].offset + x[i].length;
    }
    return NULL;
}

/*
 * The piece of a reply starting at file offset pos, at most end - pos long:
 * prefix bytes (src: offset in the prefix), zeros, or part of one memory
 * extent (src advanced to pos).  pos < end <= l->size.
 */
static struct extent piece_at(const struct layout *l, uint64_t pos, uint64_t end)
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
        size_t mid = lo + (hi - lo) / 2;
        if (l->ext[mid].offset <= pos)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo > 0) {
        const struct extent *x = &l->ext[lo - 1];
        uint64_t into = pos - x->offset;
        if (into < x->length) {
            p.kind = x->kind;
            p.fd = x->fd;
            p.src = x->src + into;
            if (p.length > x->length - into)
                p.length = x->length - into;
            return p;
        }
    }
    if (lo < l->n && l->ext[lo].offset < end)
        p.length = l->ext[lo].offset - pos;
    return p;
}

/* ==== 2. The engine and its handle table ============================== */

/* Which threads run: the device thread starts first, the reply thread second. */
enum engine_state { ENGINE_STOPPED = 0, ENGINE_DEVICE_THREAD = 1, ENGINE_BOTH = 2 };

struct engine {
    int dev_fd, app_fd, event_fd; /* the caller's: never closed here */
    int stop_rd, stop_wr;         /* readable: threads stop */
    pid_t pid;                    /* QEMU (0: none; tests) */
    enum engine_state state;
    pthread_t dev_thread, app_thread;
    /* The handle table: fh -> layout, under lock. */
    pthread_mutex_t lock;
    struct layout **tab;
    size_t ntab, captab;
    atomic_int gone;
    atomic_int no_vm_readv;
    atomic_int warned_kind;
    /* Device-thread state. */
    int pipe_r, pipe_w;
    size_t pipe_slots;
    int zero_fd;    /* a memfd hole of MAX_REPLY bytes (-1: vmsplice of zeros instead) */
    int pagemap_fd; /* /proc/PID/pagemap: which private pages QEMU ever touched */
    uint64_t zero_pfn, huge_zero_pfn; /* the kernel's zero pages (0: unknown) */
    unsigned char *rbuf, *cbuf;       /* a request; a copied reply's data */
    uint64_t answered[ANSWERED_RING]; /* uniques of the last natively answered requests */
    unsigned answered_next;
    atomic_ullong init_unique; /* FUSE_INIT's unique, to adjust libfuse's reply */
    /* Reply-thread state. */
    unsigned char *abuf;
    /* Counters (read with stats()). */
    atomic_ullong n_reads, n_spliced, n_copied, n_forwarded, n_replies, n_interrupts, bytes;
};

static void emit(struct engine *e, char code)
{
    ssize_t r;
    do {
        r = write(e->event_fd, &code, 1);
    } while (r < 0 && errno == EINTR);
}

/* A piece of a kind this engine does not serve (cannot happen: layout_check): zeros, said once. */
static void warn_kind(struct engine *e, enum extent_kind kind)
{
    if (kind != EXT_ZERO && !atomic_exchange(&e->warned_kind, 1))
        fprintf(stderr, "vmcorefs._readpath: extent kind %d read as zeros\n", (int)kind);
}

/* The layout of fh with a reference taken (layout_unref it), or NULL. */
static struct layout *table_get(struct engine *e, uint64_t fh)
{
    struct layout *found = NULL;
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

/* Install l (the table takes the caller's reference), replacing a layout of the same fh; 0 or -ENOMEM. */
static int table_put(struct engine *e, struct layout *l)
{
    struct layout *old = NULL;
    int err = 0;
    pthread_mutex_lock(&e->lock);
    for (size_t i = 0; i < e->ntab; i++) {
        if (e->tab[i]->fh == l->fh) {
            old = e->tab[i];
            e->tab[i] = l;
            goto out;
        }
    }
    if (e->ntab == e->captab) {
        size_t cap = e->captab ? 2 * e->captab : 16;
        struct layout **tab = realloc(e->tab, cap * sizeof *tab);
        if (!tab) {
            err = -ENOMEM;
            goto out;
        }
        e->tab = tab;
        e->captab = cap;
    }
    e->tab[e->ntab++] = l;
out:
    pthread_mutex_unlock(&e->lock);
    layout_unref(old);
    return err;
}

/* Forget fh; 1 if it was registered. */
static int table_drop(struct engine *e, uint64_t fh)
{
    struct layout *drop = NULL;
    pthread_mutex_lock(&e->lock);
    for (size_t i = 0; i < e->ntab; i++) {
        if (e->tab[i]->fh == fh) {
            drop = e->tab[i];
            e->tab[i] = e->tab[--e->ntab];
            break;
        }
    }
    pthread_mutex_unlock(&e->lock);
    layout_unref(drop);
    return drop != NULL;
}

/*
 * Register fh: a copy of prefix and of extents x[0..n) (see layout_check).
 * 0; -EINVAL with *why and *bad set; -ENOMEM.
 */
/*
 * Register handle fh.  pid is the QEMU its EXT_PROCMEM extents belong to:
 * 0 or the engine's own for the engine's QEMU, another for a handle of
 * another QEMU (mount --all), whose reads use that process (and its pagemap)
 * and, once it has exited, fail with EIO without ending the others' reads.
 */
static int engine_register(struct engine *e, uint64_t fh, uint64_t size, const void *prefix, size_t prefix_len,
                           const struct extent *x, size_t n, pid_t pid, const char **why, size_t *bad)
{
    *why = layout_check(x, n, prefix_len, size, bad);
    if (*why)
        return -EINVAL;
    struct layout *l = calloc(1, sizeof *l);
    if (!l)
        return -ENOMEM;
    atomic_init(&l->refs, 1);
    l->ext = malloc((n ? n : 1) * sizeof *l->ext);
    l->prefix = malloc(prefix_len ? prefix_len : 1);
    if (!l->ext || !l->prefix) {
        layout_unref(l);
        return -ENOMEM;
    }
    l->fh = fh;
    l->size = size;
    l->prefix_len = prefix_len;
    l->n = n;
    l->q = (struct qemu){.pid = e->pid, .pagemap_fd = e->pagemap_fd};
    if (pid > 0 && pid != e->pid) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/pagemap", (int)pid);
        l->q = (struct qemu){.pid = pid, .pagemap_fd = open(path, O_RDONLY | O_CLOEXEC)}; /* -1: read every page */
        l->own_pagemap = 1;
    }
    if (prefix_len)
        memcpy(l->prefix, prefix, prefix_len);
    if (n)
        memcpy(l->ext, x, n * sizeof *x);
    int err = table_put(e, l);
    if (err)
        layout_unref(l);
    return err;
}

/* ==== 3. Guest memory ================================================= */

static int qemu_alive(pid_t pid)
{
    if (pid <= 0)
        return 1;
    return kill(pid, 0) == 0 || errno == EPERM;
}

/*
 * One read of QEMU's memory.  /proc/PID/mem (EXT_PROCMEM) is read with
 * process_vm_readv at the same host address when the kernel allows it:
 * one copy and no per-page bounce buffer, about twice as fast as pread of
 * /proc/PID/mem, with the same access check (ptrace) and the same effect
 * on QEMU (a read fault maps the zero page, allocates nothing).
 */
static ssize_t read_once(atomic_int *no_vm_readv, const struct qemu *q, const struct extent *x, uint64_t src,
                         unsigned char *buf, uint64_t len)
{
    if (x->kind == EXT_PROCMEM && q->pid > 0 && !atomic_load(no_vm_readv)) {
        struct iovec local = {buf, len}, remote = {(void *)(uintptr_t)src, len};
        ssize_t n = process_vm_readv(q->pid, &local, 1, &remote, 1, 0);
        if (n >= 0 || (errno != ENOSYS && errno != EPERM))
            return n;
        atomic_store(no_vm_readv, 1); /* e.g. a seccomp filter: /proc/PID/mem from now on */
    }
    if (src > (uint64_t)INT64_MAX) {
        errno = EINVAL;
        return -1;
    }
    return pread(x->fd, buf, len, (off_t)src);
}

/* read_into(): fill buf from x at src; 0, or -1 when QEMU has exited.  no_vm_readv: the
 * caller's "process_vm_readv was refused, use /proc/PID/mem" flag (the engine's, a copier's). */
static int read_mem_plain(atomic_int *no_vm_readv, const struct qemu *q, const struct extent *x, uint64_t src,
                          unsigned char *buf, uint64_t len)
{
    uint64_t pos = 0;
    while (pos < len) {
        ssize_t n = read_once(no_vm_readv, q, x, src + pos, buf + pos, len - pos);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == ESRCH || !qemu_alive(q->pid))
                return -1;
            /* Unreadable page (EIO/EFAULT for a page QEMU unmapped): zeros. */
            uint64_t next = (src + pos) / PAGE * PAGE + PAGE - src;
            if (next > len || next <= pos)
                next = len;
            memset(buf + pos, 0, next - pos);
            pos = next;
            continue;
        }
        if (n == 0) {
            if (x->kind == EXT_PROCMEM && !qemu_alive(q->pid))
                return -1;
            memset(buf + pos, 0, len - pos);
            return 0;
        }
        pos += (uint64_t)n;
    }
    return 0;
}

/* Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst). */
#define PM_PRESENT (1ull << 63)
#define PM_SWAPPED (1ull << 62)
#define PM_MMAP_EXCLUSIVE (1ull << 56)
#define PM_MAX_PAGES (MAX_REPLY / PAGE + 1)
#define PM_PFN(e) ((e) & ((1ull << 55) - 1))
#define HUGE (2u << 20)

/*
 * A page that reads as zeros without holding data: never touched (neither
 * present nor swapped), or mapped to the kernel's zero page (or huge zero
 * page) by an earlier read fault.  PFNs are visible with CAP_SYS_ADMIN only;
 * without it only the first case is recognised.
 */
static int zero_entry(const struct engine *e, uint64_t ent)
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
        /* A page of our own (THP with its huge zero page disabled allocates
         * one) is exclusively mapped and reused by others once freed: never
         * take it for a zero page, or guest RAM landing there later would be
         * served as zeros. */
        if (fd >= 0 && pread(fd, &ent, sizeof ent, (off_t)((uintptr_t)p / PAGE * sizeof ent)) == sizeof ent
            && (ent & PM_PRESENT) && !(ent & PM_MMAP_EXCLUSIVE) && PM_PFN(ent) % (size / PAGE) == 0)
            pfn = PM_PFN(ent);
        if (fd >= 0)
            close(fd);
    }
    munmap(m, len);
    return pfn;
}

/*
 * The pagemap entries of the pages of QEMU's [src, src+len), 0 < len <=
 * MAX_REPLY, into ents[PM_MAX_PAGES]; the number of pages, or 0 when
 * unknown (no pagemap, QEMU gone, a range that wraps).
 */
static uint64_t pagemap_of(const struct qemu *q, uint64_t src, uint64_t len, uint64_t *ents)
{
    if (q->pagemap_fd < 0 || len == 0 || len > MAX_REPLY || src + len < src)
        return 0;
    uint64_t first = src / PAGE, n = (src + len - 1) / PAGE - first + 1;
    if (n > PM_MAX_PAGES)
        return 0;
    ssize_t r = pread(q->pagemap_fd, ents, n * sizeof *ents, (off_t)(first * sizeof *ents));
    return r == (ssize_t)(n * sizeof *ents) ? n : 0;
}

/*
 * Private RAM that holds no data -- never touched, or only read and mapped
 * to the zero page -- is zeros: answering that from the pagemap, rather
 * than reading it, costs no copy and does not make the kernel map the zero
 * page into QEMU (which grows QEMU's page tables by 2 MiB per GiB read).
 */
static int untouched(struct engine *e, const struct qemu *q, uint64_t src, uint64_t len)
{
    uint64_t ents[PM_MAX_PAGES];
    uint64_t n = pagemap_of(q, src, len, ents);
    if (n == 0)
        return 0;
    for (uint64_t i = 0; i < n; i++)
        if (!zero_entry(e, ents[i]))
            return 0;
    return 1;
}

/* read_into() for /proc/PID/mem: untouched pages as zeros, the rest read. */
static int read_procmem(struct engine *e, const struct qemu *q, const struct extent *x, uint64_t src,
                        unsigned char *buf, uint64_t len)
{
    uint64_t ents[PM_MAX_PAGES];
    uint64_t n = pagemap_of(q, src, len, ents);
    if (n == 0)
        return read_mem_plain(&e->no_vm_readv, q, x, src, buf, len);
    uint64_t first = src / PAGE, pos = 0, i = 0;
    while (pos < len) {
        int touched = !zero_entry(e, ents[i]);
        while (i < n && (!zero_entry(e, ents[i])) == touched)
            i++;
        uint64_t end = (first + i) * PAGE - src;
        if (end > len)
            end = len;
        if (!touched)
            memset(buf + pos, 0, end - pos);
        else if (read_mem_plain(&e->no_vm_readv, q, x, src + pos, buf + pos, end - pos) < 0)
            return -1;
        pos = end;
    }
    return 0;
}

/* Fill buf with the len bytes of memory piece x (EXT_SHARED, EXT_PROCMEM); 0, or -1 when QEMU has exited. */
static int read_mem(struct engine *e, const struct qemu *q, const struct extent *x, unsigned char *buf,
                    uint64_t len)
{
    switch (x->kind) {
    case EXT_PROCMEM:
        return read_procmem(e, q, x, x->src, buf, len);
    case EXT_SHARED:
        return read_mem_plain(&e->no_vm_readv, q, x, x->src, buf, len);
    default:
        warn_kind(e, x->kind);
        memset(buf, 0, len);
        return 0;
    }
}

/* ==== 4. Replies: copied, or spliced ================================== */

static int write_all_dev(struct engine *e, const struct iovec *iov, int n)
{
    ssize_t r;
    do {
        r = writev(e->dev_fd, iov, n);
    } while (r < 0 && errno == EINTR);
    /* ENOENT: the request was interrupted and is gone; nothing to do. */
    return r < 0 ? -errno : 0;
}

static void reply_err(struct engine *e, uint64_t unique, int err)
{
    struct fuse_out_header oh = {.len = sizeof oh, .error = -err, .unique = unique};
    struct iovec iov = {&oh, sizeof oh};
    write_all_dev(e, &iov, 1);
}

/* The reply [off, off+len) of l assembled in cbuf and written; 0, or -1 when QEMU has exited. */
static int copy_reply(struct engine *e, struct fuse_out_header *oh, const struct layout *l, uint64_t off,
                      uint64_t len)
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
            if (read_mem(e, &l->q, &p, dst, p.length) < 0)
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
    atomic_fetch_add(&e->n_copied, 1); /* before the reply: whoever has it sees the count */
    write_all_dev(e, iov, 2);
    return 0;
}

static int pipe_open(struct engine *e)
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

static void pipe_close(struct engine *e)
{
    if (e->pipe_r >= 0)
        close(e->pipe_r);
    if (e->pipe_w >= 0)
        close(e->pipe_w);
    e->pipe_r = e->pipe_w = -1;
    e->pipe_slots = 0;
}

/* A pipe that may hold part of an unsent message is replaced (-1 until a new one opens). */
static void pipe_reset(struct engine *e)
{
    pipe_close(e);
    pipe_open(e);
}

static uint64_t pages_spanned(uint64_t addr, uint64_t len)
{
    return len ? (addr + len - 1) / PAGE - addr / PAGE + 1 : 0;
}

static int vmsplice_all(struct engine *e, const void *base, uint64_t len)
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
static int splice_zeros(struct engine *e, uint64_t len)
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

/* A shared-file piece spliced into the pipe; bytes past the file's end as zeros. */
static int splice_shared(struct engine *e, const struct extent *p)
{
    loff_t src = (loff_t)p->src; /* layout_check: src + length fits off_t */
    uint64_t left = p->length;
    while (left) {
        ssize_t n = splice(p->fd, &src, e->pipe_w, NULL, left, SPLICE_F_NONBLOCK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1; /* e.g. EINVAL: this file cannot splice */
        if (n == 0)
            return splice_zeros(e, left); /* past the end of the backing file */
        left -= (uint64_t)n;
    }
    return 0;
}

/*
 * Reply by splicing: header and literal bytes with vmsplice, shared-file
 * memory with splice (page references, no copy), then the whole message
 * from the pipe into /dev/fuse in one splice.  Returns 1 when replied,
 * 0 when the reply must be copied instead (nothing was sent).
 */
static int splice_reply(struct engine *e, struct fuse_out_header *oh, const struct layout *l, uint64_t off,
                        uint64_t len)
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
            if (!untouched(e, &l->q, p.src, p.length))
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
        int r;
        switch (p.kind) {
        case EXT_PREFIX:
            r = vmsplice_all(e, l->prefix + p.src, p.length);
            break;
        case EXT_SHARED:
            r = splice_shared(e, &p);
            break;
        case EXT_PROCMEM: /* untouched, checked above */
            r = splice_zeros(e, p.length);
            break;
        case EXT_ZERO:
        default:
            warn_kind(e, p.kind);
            r = splice_zeros(e, p.length);
            break;
        }
        if (r < 0)
            goto fallback;
        pos += p.length;
    }
    atomic_fetch_add(&e->n_spliced, 1); /* before the reply: whoever has it sees the count */
    for (;;) {
        ssize_t n = splice(e->pipe_r, NULL, e->dev_fd, NULL, oh->len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)oh->len)
            pipe_reset(e); /* e.g. ENOENT: the request was interrupted; drop what is left */
        break;
    }
    return 1;
fallback:
    pipe_reset(e);
    return 0;
}

/* FUSE_READ of [off, off+size) of l, answered: short at the end of the file, EIO once QEMU is gone. */
static void serve_read(struct engine *e, uint64_t unique, const struct layout *l, uint64_t off, uint32_t size)
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
        /* The engine's QEMU has exited: every read fails from now on.  Another
         * QEMU of a handle's own: its reads fail, each finding it gone. */
        if (l->q.pid == e->pid && !atomic_exchange(&e->gone, 1))
            emit(e, 'G');
        reply_err(e, unique, EIO);
    }
}

/* ==== 5. The FUSE proxy =============================================== */

static void forward(struct engine *e, const unsigned char *buf, size_t n)
{
    const struct fuse_in_header *h = (const struct fuse_in_header *)buf;
    ssize_t w;
    do {
        w = send(e->app_fd, buf, n, MSG_NOSIGNAL);
    } while (w < 0 && errno == EINTR);
    if (w < 0 && h->opcode != FUSE_FORGET && h->opcode != FUSE_BATCH_FORGET && h->opcode != FUSE_INTERRUPT)
        reply_err(e, h->unique, EIO); /* pyfuse3 is gone: do not leave the caller hanging */
    atomic_fetch_add(&e->n_forwarded, 1);
}

static int answered_here(const struct engine *e, uint64_t unique)
{
    for (unsigned i = 0; i < ANSWERED_RING; i++)
        if (e->answered[i] == unique && unique)
            return 1;
    return 0;
}

/*
 * FUSE_INTERRUPT of request fuse_interrupt_in.unique.  The kernel queues an
 * interrupt only for a request userspace has already read, and hands out
 * queued interrupts before any other request; this thread answers each
 * FUSE_READ it serves before reading the next message.  So an interrupt of
 * a natively served read always arrives after its answer, and within the
 * next few messages: it is dropped (an interrupt needs no reply -- the
 * kernel only acts on EAGAIN, to re-queue it -- and forwarding it would
 * leave libfuse holding an interrupt that matches none of its requests).
 * Interrupts of requests pyfuse3 serves are forwarded to it.  Returns 1
 * when dropped.
 */
static int handle_interrupt(struct engine *e, const struct fuse_in_header *h, size_t n)
{
    if (n < sizeof *h + sizeof(struct fuse_interrupt_in))
        return 0;
    const struct fuse_interrupt_in *in = (const struct fuse_interrupt_in *)(h + 1);
    if (!answered_here(e, in->unique))
        return 0;
    atomic_fetch_add(&e->n_interrupts, 1);
    return 1;
}

/* FUSE_READ of a registered handle, answered here (1), or 0 for pyfuse3. */
static int handle_read(struct engine *e, const struct fuse_in_header *h, size_t n)
{
    if (n < sizeof *h + sizeof(struct fuse_read_in))
        return 0;
    const struct fuse_read_in *r = (const struct fuse_read_in *)(h + 1);
    struct layout *l = table_get(e, r->fh);
    if (!l)
        return 0;
    serve_read(e, h->unique, l, r->offset, r->size);
    layout_unref(l);
    e->answered[e->answered_next++ % ANSWERED_RING] = h->unique;
    return 1;
}

/*
 * One message from the kernel, buf[0..n) (8-byte aligned): READs of
 * registered handles and interrupts of them handled here, the rest sent
 * to pyfuse3 as they are.  Lengths are taken from n, the size the device
 * gave, never from the header.
 */
static void handle_request(struct engine *e, unsigned char *buf, size_t n)
{
    if (n < sizeof(struct fuse_in_header))
        return; /* not a request: the device never returns less */
    const struct fuse_in_header *h = (const struct fuse_in_header *)buf;
    int done = 0;
    switch (h->opcode) {
    case FUSE_INIT:
        atomic_store(&e->init_unique, h->unique);
        break;
    case FUSE_READ:
        done = handle_read(e, h, n);
        break;
    case FUSE_INTERRUPT:
        done = handle_interrupt(e, h, n);
        break;
    default:
        break;
    }
    if (!done)
        forward(e, buf, n);
}

/*
 * A spliced reply must fit the pipe whole: header + up to max_pages pages.
 * Without CAP_SYS_RESOURCE a pipe holds at most pipe-max-size (1 MiB, 256
 * pages), one page short for a 1 MiB read; then cap the requests' size
 * (FUSE_INIT's max_pages) so that every read can be spliced.
 */
static void limit_max_pages(struct engine *e, struct fuse_init_out *out)
{
    if (!(out->flags & FUSE_MAX_PAGES) || e->pipe_slots < 2)
        return;
    uint64_t cap = e->pipe_slots - 1;
    if (out->max_pages > cap)
        out->max_pages = (uint16_t)cap;
}

/*
 * One message from pyfuse3, buf[0..n) (8-byte aligned), to the kernel.
 * The reply to FUSE_INIT is adjusted (limit_max_pages) and reported: 'R'
 * when libfuse accepted the connection, 'I' when it refused it (it then
 * ends its session by itself: the daemon must not look like it mounted).
 */
static void handle_reply(struct engine *e, unsigned char *buf, size_t n)
{
    struct fuse_out_header *oh = (struct fuse_out_header *)buf;
    unsigned long long init = atomic_load(&e->init_unique);
    if (n >= sizeof *oh && init && oh->unique == init && atomic_compare_exchange_strong(&e->init_unique, &init, 0)) {
        if (oh->error == 0 && n >= sizeof *oh + offsetof(struct fuse_init_out, max_pages) + sizeof(uint16_t))
            limit_max_pages(e, (struct fuse_init_out *)(oh + 1));
        emit(e, oh->error ? 'I' : 'R');
    }
    struct iovec iov = {buf, n};
    write_all_dev(e, &iov, 1);
    atomic_fetch_add(&e->n_replies, 1);
}

/* Wait until fd is readable: 0, or -1 when told to stop. */
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

/* The device thread: requests from the kernel. */
static void *dev_main(void *arg)
{
    struct engine *e = arg;
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
        handle_request(e, e->rbuf, (size_t)n);
    }
}

/* The reply thread: replies and notifications from pyfuse3, one message each. */
static void *app_main(void *arg)
{
    struct engine *e = arg;
    for (;;) {
        ssize_t n = recv(e->app_fd, e->abuf, REQ_BUF, MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0) {
            if (errno == EAGAIN) {
                if (wait_readable(e->app_fd, e->stop_rd) < 0)
                    return NULL;
                continue;
            }
            if (errno == EINTR)
                continue;
            return NULL;
        }
        if (n == 0)
            return NULL; /* pyfuse3 closed its end */
        if ((size_t)n > REQ_BUF)
            continue; /* cannot happen: replies are at most one read's size */
        handle_reply(e, e->abuf, (size_t)n);
    }
}

/* ==== 6. Engine life cycle ============================================ */

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

/* Testing: the n-th next pthread_create of an engine fails with EAGAIN (0: none). */
static atomic_int fail_thread_create;

static int thread_create(pthread_t *t, void *(*fn)(void *), void *arg)
{
    int n = atomic_load(&fail_thread_create);
    while (n > 0 && !atomic_compare_exchange_weak(&fail_thread_create, &n, n - 1))
        ;
    if (n == 1)
        return EAGAIN;
    return pthread_create(t, NULL, fn, arg);
}

static void engine_close(struct engine *e);

/*
 * Set up e to serve dev_fd (made non-blocking) for app_fd, reporting on
 * event_fd; pid is QEMU's (0: none).  0, or -errno with e closed.
 */
static int engine_open(struct engine *e, int dev_fd, int app_fd, int event_fd, pid_t pid)
{
    memset(e, 0, sizeof *e);
    e->stop_rd = e->stop_wr = e->pipe_r = e->pipe_w = e->zero_fd = e->pagemap_fd = -1;
    e->dev_fd = dev_fd;
    e->app_fd = app_fd;
    e->event_fd = event_fd;
    e->pid = pid;
    e->state = ENGINE_STOPPED;
    pthread_mutex_init(&e->lock, NULL);
    int p[2], err = 0;
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) {
        err = -errno;
        goto fail;
    }
    e->stop_rd = p[0];
    e->stop_wr = p[1];
    e->rbuf = malloc(REQ_BUF);
    e->abuf = malloc(REQ_BUF);
    e->cbuf = malloc(MAX_REPLY);
    if (!e->rbuf || !e->abuf || !e->cbuf) {
        err = -ENOMEM;
        goto fail;
    }
    pipe_open(e);
    e->zero_fd = open_zeros();
    if (pid > 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/pagemap", (int)pid);
        e->pagemap_fd = open(path, O_RDONLY | O_CLOEXEC); /* -1: read every page */
    }
    /* Also without a QEMU of its own: handles may name theirs (engine_register). */
    e->zero_pfn = own_zero_pfn(PAGE, 0);
    uint64_t huge = own_zero_pfn(HUGE, 1);
    if (huge != e->zero_pfn)
        e->huge_zero_pfn = huge;
    int fl = fcntl(dev_fd, F_GETFL);
    if (fl < 0 || fcntl(dev_fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        err = -errno;
        goto fail;
    }
    return 0;
fail:
    engine_close(e);
    return err;
}

/* Stop the threads that run and wait for them; the engine can start again. */
static void engine_stop(struct engine *e)
{
    if (e->state == ENGINE_STOPPED)
        return;
    char c = 'x';
    if (write(e->stop_wr, &c, 1) < 0) {
        /* cannot fail on a fresh non-blocking pipe drained at every stop */
    }
    pthread_join(e->dev_thread, NULL);
    if (e->state == ENGINE_BOTH)
        pthread_join(e->app_thread, NULL);
    e->state = ENGINE_STOPPED;
    while (read(e->stop_rd, &c, 1) == 1)
        ;
}

/*
 * Start the device thread, then the reply thread: 0, or -errno with no
 * thread left running (a device thread already started is stopped and
 * joined before returning, so that nothing reads the buffers it used).
 */
static int engine_start(struct engine *e, const char **which)
{
    if (e->state != ENGINE_STOPPED)
        return 0;
    int err = thread_create(&e->dev_thread, dev_main, e);
    if (err) {
        *which = "device";
        return -err;
    }
    e->state = ENGINE_DEVICE_THREAD;
    err = thread_create(&e->app_thread, app_main, e);
    if (err) {
        engine_stop(e);
        *which = "reply";
        return -err;
    }
    e->state = ENGINE_BOTH;
    return 0;
}

/* Stop, forget every handle, close what the engine opened (not dev/app/event fds), free. */
static void engine_close(struct engine *e)
{
    engine_stop(e);
    for (size_t i = 0; i < e->ntab; i++)
        layout_unref(e->tab[i]);
    free(e->tab);
    free(e->rbuf);
    free(e->abuf);
    free(e->cbuf);
    e->tab = NULL;
    e->ntab = e->captab = 0;
    e->rbuf = e->abuf = e->cbuf = NULL;
    pipe_close(e);
    int *fds[] = {&e->stop_rd, &e->stop_wr, &e->zero_fd, &e->pagemap_fd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
    pthread_mutex_destroy(&e->lock);
}

/* ==== 7. The dump copier =============================================== */

/*
 * vmcorefs dump's copy (vmcorefs.dump.copy_runs): the populated runs of
 * guest memory -- extents like a layout's (offset in the output file,
 * length, kind EXT_SHARED or EXT_PROCMEM, src, fd) -- read in chunks and
 * written at their file offsets, all-zero pages left as holes.  Several
 * threads each take the next chunk, read it (section 3: process_vm_readv or
 * pread) into a buffer of their own and pwrite its non-zero pages, so the
 * reads and the writes of one dump use every core and no chunk waits for
 * another; the output is the same whatever the order.  No lock is held
 * while copying; the Python caller polls the counters and may ask to stop.
 */
#define COPIER_MAX_THREADS 16

struct copier {
    int out_fd;
    struct qemu q; /* pid for process_vm_readv and liveness; no pagemap: runs are populated */
    struct extent *run;
    size_t nrun;
    uint64_t chunk;
    pthread_mutex_t lock; /* the cursor */
    size_t next_run;
    uint64_t next_pos;
    atomic_int stop;      /* asked to stop, or a thread failed */
    atomic_int err;       /* the first failure's errno (ESRCH: QEMU exited) */
    atomic_int no_vm_readv;
    atomic_ullong done;    /* bytes of runs copied */
    atomic_ullong written; /* of which written (not all-zero pages) */
};

/* Is this page all zero bytes?  Most data pages show it at one end. */
static int page_is_zero(const unsigned char *p)
{
    return p[0] == 0 && p[PAGE - 1] == 0 && memcmp(p, zeros, PAGE) == 0;
}

static int pwrite_all(int fd, const unsigned char *buf, uint64_t len, uint64_t off)
{
    while (len) {
        ssize_t n = pwrite(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        buf += n;
        len -= (uint64_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/* Write buf's len bytes at file offset off, all-zero pages left out; bytes written, or -errno. */
static int64_t write_nonzero(int fd, const unsigned char *buf, uint64_t len, uint64_t off)
{
    uint64_t total = 0, start = 0;
    int in_run = 0;
    for (uint64_t pos = 0; pos <= len; pos += PAGE) {
        int zero = 1; /* past the end: closes the last run */
        if (pos < len) {
            uint64_t n = len - pos < PAGE ? len - pos : PAGE;
            zero = n == PAGE ? page_is_zero(buf + pos) : memcmp(buf + pos, zeros, n) == 0;
        }
        if (!zero && !in_run) {
            start = pos;
            in_run = 1;
        } else if (zero && in_run) {
            uint64_t end = pos < len ? pos : len;
            int r = pwrite_all(fd, buf + start, end - start, off + start);
            if (r)
                return r;
            total += end - start;
            in_run = 0;
        }
    }
    return (int64_t)total;
}

/* The next piece to copy (at most c->chunk bytes of one run); 0 when none is left. */
static int copier_take(struct copier *c, struct extent *piece)
{
    int got = 0;
    pthread_mutex_lock(&c->lock);
    if (c->next_run < c->nrun) {
        const struct extent *r = &c->run[c->next_run];
        uint64_t n = r->length - c->next_pos < c->chunk ? r->length - c->next_pos : c->chunk;
        *piece = *r;
        piece->offset = r->offset + c->next_pos;
        piece->src = r->src + c->next_pos;
        piece->length = n;
        c->next_pos += n;
        if (c->next_pos >= r->length) {
            c->next_run++;
            c->next_pos = 0;
        }
        got = 1;
    }
    pthread_mutex_unlock(&c->lock);
    return got;
}

static void copier_fail(struct copier *c, int err)
{
    int none = 0;
    atomic_compare_exchange_strong(&c->err, &none, err);
    atomic_store(&c->stop, 1);
}

static void *copier_main(void *arg)
{
    struct copier *c = arg;
    unsigned char *buf = NULL;
    if (posix_memalign((void **)&buf, PAGE, c->chunk)) {
        copier_fail(c, ENOMEM);
        return NULL;
    }
    struct extent piece;
    while (!atomic_load(&c->stop) && copier_take(c, &piece)) {
        if (read_mem_plain(&c->no_vm_readv, &c->q, &piece, piece.src, buf, piece.length) < 0) {
            copier_fail(c, ESRCH);
            break;
        }
        int64_t n = write_nonzero(c->out_fd, buf, piece.length, piece.offset);
        if (n < 0) {
            copier_fail(c, (int)-n);
            break;
        }
        atomic_fetch_add(&c->written, (unsigned long long)n);
        atomic_fetch_add(&c->done, piece.length);
    }
    free(buf);
    return NULL;
}

/* Copy every run with up to nthreads threads (this one among them); 0 or the first failure's errno. */
static int copier_run(struct copier *c, int nthreads)
{
    pthread_t t[COPIER_MAX_THREADS];
    sigset_t all, old;
    int started = 0;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* signals stay with the caller's threads */
    for (int i = 1; i < nthreads && i < COPIER_MAX_THREADS; i++) {
        if (thread_create(&t[started], copier_main, c))
            break; /* fewer threads: slower, same bytes */
        started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    copier_main(c);
    for (int i = 0; i < started; i++)
        pthread_join(t[i], NULL);
    return atomic_load(&c->err);
}

/* ==== 8. The CPython binding ========================================== */
#ifndef READPATH_NO_PYTHON

typedef struct {
    PyObject_HEAD
    struct engine e;
    int open; /* engine_open succeeded; engine_close pending */
} Engine;

static int Engine_init(Engine *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"dev_fd", "app_fd", "event_fd", "pid", NULL};
    int dev_fd, app_fd, event_fd, pid = 0;
    if (self->open) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.__init__ called twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iii|i", kwlist, &dev_fd, &app_fd, &event_fd, &pid))
        return -1;
    int err = engine_open(&self->e, dev_fd, app_fd, event_fd, pid);
    if (err) {
        errno = -err;
        PyErr_SetFromErrno(err == -ENOMEM ? PyExc_MemoryError : PyExc_OSError);
        return -1;
    }
    self->open = 1;
    return 0;
}

static int Engine_check(Engine *self)
{
    if (!self->open)
        PyErr_SetString(PyExc_RuntimeError, "Engine not initialised");
    return self->open;
}

static PyObject *Engine_start(Engine *self, PyObject *unused)
{
    if (!Engine_check(self))
        return NULL;
    const char *which = "";
    int err = engine_start(&self->e, &which);
    if (err) {
        errno = -err;
        return PyErr_Format(PyExc_OSError, "cannot start the native read path's %s thread: %s", which,
                            strerror(-err));
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(Engine *self, PyObject *unused)
{
    if (self->open) {
        Py_BEGIN_ALLOW_THREADS
        engine_stop(&self->e);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_register(Engine *self, PyObject *args)
{
    unsigned long long fh, size;
    Py_buffer prefix;
    PyObject *extents;
    int pid = 0;
    if (!Engine_check(self) || !PyArg_ParseTuple(args, "KKy*O|i", &fh, &size, &prefix, &extents, &pid))
        return NULL;
    PyObject *seq = PySequence_Fast(extents, "extents must be a sequence");
    struct extent *x = NULL;
    if (!seq)
        goto out;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    x = PyMem_Calloc(n ? (size_t)n : 1, sizeof *x);
    if (!x) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long off, len, src;
        int kind, fd;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKiKi", &off, &len, &kind, &src, &fd))
            goto out;
        if (kind != EXT_SHARED && kind != EXT_PROCMEM) { /* before the enum could hold an unnamed value */
            PyErr_Format(PyExc_ValueError, "extent %zd (offset %#llx) of handle %llu: kind %d is not EXT_SHARED"
                         " (%d) or EXT_PROCMEM (%d)", i, off, fh, kind, EXT_SHARED, EXT_PROCMEM);
            goto out;
        }
        x[i] = (struct extent){.offset = off, .length = len, .kind = (enum extent_kind)kind, .src = src, .fd = fd};
    }
    const char *why = NULL;
    size_t bad = 0;
    int err = engine_register(&self->e, fh, size, prefix.buf, (size_t)prefix.len, x, (size_t)n, (pid_t)pid, &why,
                              &bad);
    if (err == -EINVAL && (size_t)prefix.len > size)
        PyErr_Format(PyExc_ValueError, "handle %llu: %s (%zd > %llu bytes)", fh, why, prefix.len, size);
    else if (err == -EINVAL)
        PyErr_Format(PyExc_ValueError, "extent %zu (offset %#llx, length %#llx) of handle %llu: %s", bad,
                     (unsigned long long)x[bad].offset, (unsigned long long)x[bad].length, fh, why);
    else if (err)
        PyErr_NoMemory();
out:
    PyMem_Free(x);
    Py_XDECREF(seq);
    PyBuffer_Release(&prefix);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_unregister(Engine *self, PyObject *arg)
{
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || !Engine_check(self))
        return NULL;
    return PyBool_FromLong(table_drop(&self->e, fh));
}

static PyObject *Engine_set_gone(Engine *self, PyObject *unused)
{
    if (!Engine_check(self))
        return NULL;
    atomic_store(&self->e.gone, 1);
    Py_RETURN_NONE;
}

static PyObject *Engine_stats(Engine *self, PyObject *unused)
{
    if (!Engine_check(self))
        return NULL;
    struct engine *e = &self->e;
    pthread_mutex_lock(&e->lock);
    Py_ssize_t handles = (Py_ssize_t)e->ntab;
    pthread_mutex_unlock(&e->lock);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:n,s:i,s:i,s:i,s:i,s:i}",
                         "reads", (unsigned long long)atomic_load(&e->n_reads),
                         "spliced", (unsigned long long)atomic_load(&e->n_spliced),
                         "copied", (unsigned long long)atomic_load(&e->n_copied),
                         "bytes", (unsigned long long)atomic_load(&e->bytes),
                         "forwarded", (unsigned long long)atomic_load(&e->n_forwarded),
                         "replies", (unsigned long long)atomic_load(&e->n_replies),
                         "interrupts_dropped", (unsigned long long)atomic_load(&e->n_interrupts),
                         "pipe_bytes", (Py_ssize_t)(e->pipe_slots * PAGE),
                         "handles", handles,
                         "threads", (int)e->state,
                         "pagemap", e->pagemap_fd >= 0,
                         "zero_pfn_known", e->zero_pfn != 0,
                         "process_vm_readv", !atomic_load(&e->no_vm_readv),
                         "zeros_memfd", e->zero_fd >= 0);
}

static void Engine_dealloc(Engine *self)
{
    if (self->open) {
        Py_BEGIN_ALLOW_THREADS
        engine_close(&self->e);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *fail_next_thread_create(PyObject *module, PyObject *arg)
{
    int n = (int)PyLong_AsLong(arg);
    if (PyErr_Occurred())
        return NULL;
    atomic_store(&fail_thread_create, n);
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS,
     "Start the device and reply threads (OSError, and no thread left running, if one cannot start)."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS, "Stop both threads and wait for them."},
    {"register", (PyCFunction)Engine_register, METH_VARARGS,
     "register(fh, size, prefix, extents, pid=0): serve READs of fh natively.\n"
     "extents: sorted (offset, length, kind, src, fd) like vmcorefs.core.layout.Extent; kind EXT_SHARED\n"
     "(src: offset in fd, spliced) or EXT_PROCMEM (src: QEMU's address, fd: /proc/PID/mem).\n"
     "pid: the QEMU process of the EXT_PROCMEM extents when not the engine's (0: the engine's).\n"
     "ValueError for another kind or a layout that is not one."},
    {"unregister", (PyCFunction)Engine_unregister, METH_O, "Forget fh; True if it was registered."},
    {"set_gone", (PyCFunction)Engine_set_gone, METH_NOARGS, "QEMU has exited: fail every read with EIO."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Counters and state of the native read path."},
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

/* -- Copier ------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    struct copier c;
    int ready;   /* __init__ succeeded: run() may be called (once) */
    int running; /* run() in progress */
} Copier;

static int Copier_init(Copier *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"out_fd", "runs", "pid", "chunk", NULL};
    int out_fd, pid = 0;
    unsigned long long chunk = 4u << 20;
    PyObject *runs;
    if (self->c.run) {
        PyErr_SetString(PyExc_RuntimeError, "Copier.__init__ called twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO|iK", kwlist, &out_fd, &runs, &pid, &chunk))
        return -1;
    if (chunk < PAGE || chunk % PAGE || chunk > (1ull << 30)) {
        PyErr_Format(PyExc_ValueError, "chunk must be a multiple of %u bytes up to 1 GiB, not %llu", PAGE, chunk);
        return -1;
    }
    PyObject *seq = PySequence_Fast(runs, "runs must be a sequence of (offset, length, kind, src, fd)");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    struct extent *run = calloc(n ? (size_t)n : 1, sizeof(*run));
    if (!run) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long off, len, src;
        int kind, fd;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKiKi", &off, &len, &kind, &src, &fd)) {
            free(run);
            Py_DECREF(seq);
            return -1;
        }
        if (kind != EXT_SHARED && kind != EXT_PROCMEM) {
            free(run);
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "run %zd: kind %d is not EXT_SHARED or EXT_PROCMEM", i, kind);
            return -1;
        }
        run[i] = (struct extent){off, len, (enum extent_kind)kind, src, fd};
    }
    Py_DECREF(seq);
    struct copier *c = &self->c;
    memset(c, 0, sizeof(*c));
    c->out_fd = out_fd;
    c->q = (struct qemu){pid, -1};
    c->run = run;
    c->nrun = (size_t)n;
    c->chunk = chunk;
    pthread_mutex_init(&c->lock, NULL);
    self->ready = 1;
    return 0;
}

static PyObject *Copier_run(Copier *self, PyObject *args)
{
    int nthreads = 2;
    if (!PyArg_ParseTuple(args, "|i", &nthreads))
        return NULL;
    if (!self->ready || self->running) {
        PyErr_SetString(PyExc_RuntimeError, self->running ? "Copier.run() already running" : "Copier not initialised");
        return NULL;
    }
    self->running = 1;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = copier_run(&self->c, nthreads < 1 ? 1 : nthreads);
    Py_END_ALLOW_THREADS
    self->running = 0;
    self->ready = 0; /* once */
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Copier_cancel(Copier *self, PyObject *unused)
{
    atomic_store(&self->c.stop, 1);
    Py_RETURN_NONE;
}

static PyObject *Copier_progress(Copier *self, PyObject *unused)
{
    return Py_BuildValue("(KK)", (unsigned long long)atomic_load(&self->c.done),
                         (unsigned long long)atomic_load(&self->c.written));
}

static void Copier_dealloc(Copier *self)
{
    if (self->c.run) {
        free(self->c.run);
        pthread_mutex_destroy(&self->c.lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Copier_methods[] = {
    {"run", (PyCFunction)Copier_run, METH_VARARGS,
     "run(threads=2): copy every run (blocking, without the GIL; once).  Returns when done or cancelled;\n"
     "OSError with the first failure's errno: a write's (ENOSPC...), ESRCH when QEMU exited."},
    {"cancel", (PyCFunction)Copier_cancel, METH_NOARGS, "Stop after the chunks being copied (any thread)."},
    {"progress", (PyCFunction)Copier_progress, METH_NOARGS,
     "(bytes of runs copied, of which written): all-zero pages are not written."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CopierType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vmcorefs._readpath.Copier",
    .tp_basicsize = sizeof(Copier),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Copier(out_fd, runs, pid=0, chunk=4 MiB): vmcorefs dump's copy of populated guest memory.\n"
              "runs: (offset in out_fd, length, kind, src, fd) like a layout's extents, kind EXT_SHARED\n"
              "(src: offset in fd) or EXT_PROCMEM (src: QEMU's address, fd: /proc/PID/mem; pid: QEMU's).\n"
              "All-zero pages are left as holes.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Copier_init,
    .tp_dealloc = (destructor)Copier_dealloc,
    .tp_methods = Copier_methods,
};

static PyMethodDef module_methods[] = {
    {"_fail_next_thread_create", fail_next_thread_create, METH_O,
     "Testing: make the n-th next thread an Engine starts fail with EAGAIN (0: none)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmcorefs._readpath",
    "The native FUSE_READ path (see the C source's header comment).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__readpath(void)
{
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&CopierType) < 0)
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
    Py_INCREF(&CopierType);
    if (PyModule_AddObject(m, "Copier", (PyObject *)&CopierType) < 0) {
        Py_DECREF(&CopierType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "EXT_PREFIX", EXT_PREFIX) < 0
        || PyModule_AddIntConstant(m, "EXT_ZERO", EXT_ZERO) < 0
        || PyModule_AddIntConstant(m, "EXT_MEMORY", EXT_MEMORY) < 0
        || PyModule_AddIntConstant(m, "EXT_SHARED", EXT_SHARED) < 0
        || PyModule_AddIntConstant(m, "EXT_PROCMEM", EXT_PROCMEM) < 0
        || PyModule_AddIntConstant(m, "MAX_REPLY", MAX_REPLY) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

#endif /* READPATH_NO_PYTHON */
