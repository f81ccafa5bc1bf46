/*
 * libFuzzer harness of the native read path (src/vmcorefs/_readpath.c,
 * sections 1-6, built without CPython): what the engine reads from
 * /dev/fuse and from pyfuse3, and the layouts it is given, are the fuzzer's.
 *
 * One engine serves the whole run: its /dev/fuse is one end of a stream
 * socket pair (the fake kernel reads the replies from the other end), its
 * pyfuse3 end a SOCK_SEQPACKET pair.  Guest memory is a memfd (EXT_SHARED:
 * data, then a hole) and this process's own memory (EXT_PROCMEM through
 * process_vm_readv and /proc/self/mem: data, then untouched pages).  An
 * input is a program of operations (see run_op):
 *
 *   raw request / raw reply      hostile headers: any length, opcode, unique
 *   register / unregister        well-formed layouts, or hostile ones (any
 *                                offsets, lengths, kinds, addresses near 2^64)
 *   read / interrupt / init      well-formed requests with fuzzed fields
 *   gone                         QEMU exited
 *
 * Besides the sanitizers' checks, every read of a well-formed layout is
 * compared with the sparse-file model (prefix, memory, zeros, short at the
 * end of the file), and must get exactly one reply: a mismatch aborts.
 */
#define READPATH_NO_PYTHON
#include "../../src/vmcorefs/_readpath.c"

#include <assert.h>
#include <sys/socket.h>

#define MEM (256u * 1024u) /* bytes of each kind of guest memory */
#define HANDLES 4
#define SOCKBUF (8 << 20)

static struct engine E;
static int kernel_fd, app_peer, memfd, procmem_fd;
static unsigned char shared_mem[MEM];
static unsigned char *private_mem; /* first half written, second half never touched */
static unsigned char *drained;     /* what the engine wrote to the fake kernel */
static uint64_t next_unique = 2;

/* The model of each handle: valid only for well-formed layouts. */
static struct model {
    int registered, known;
    uint64_t size;
    unsigned char prefix[8192];
    size_t prefix_len;
    struct extent ext[8];
    size_t n;
} models[HANDLES];

struct input {
    const uint8_t *p;
    size_t left;
};

static uint64_t take(struct input *in, unsigned bytes)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < bytes; i++) {
        uint64_t b = in->left ? (in->left--, *in->p++) : 0;
        v |= b << (8 * i);
    }
    return v;
}

static void bigbuf(int fd)
{
    int size = SOCKBUF;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    int dev[2], app[2], ev[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, dev) || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, app)
        || pipe2(ev, O_CLOEXEC | O_NONBLOCK))
        abort();
    for (int i = 0; i < 2; i++) {
        bigbuf(dev[i]);
        bigbuf(app[i]);
    }
    kernel_fd = dev[0];
    app_peer = app[0];
    fcntl(kernel_fd, F_SETFL, O_NONBLOCK);
    fcntl(app_peer, F_SETFL, O_NONBLOCK);
    for (unsigned i = 0; i < MEM / 2; i++)
        shared_mem[i] = (unsigned char)(i * 7 + (i >> 12));
    memfd = memfd_create("fuzz-shared", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, MEM) || pwrite(memfd, shared_mem, MEM / 2, 0) != MEM / 2)
        abort();
    private_mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (private_mem == MAP_FAILED)
        abort();
    for (unsigned i = 0; i < MEM / 2; i++)
        private_mem[i] = (unsigned char)(i * 13 + 1);
    procmem_fd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
    drained = malloc(SOCKBUF);
    if (procmem_fd < 0 || !drained || engine_open(&E, dev[1], app[1], ev[1], getpid()))
        abort();
    return 0;
}

/* Everything the engine wrote to the fake kernel since the last call; its length. */
static size_t drain_kernel(void)
{
    size_t got = 0;
    for (;;) {
        ssize_t n = recv(kernel_fd, drained + got, SOCKBUF - got, MSG_DONTWAIT);
        if (n <= 0)
            return got;
        got += (size_t)n;
    }
}

static void drain_app(void)
{
    static unsigned char sink[REQ_BUF];
    while (recv(app_peer, sink, sizeof sink, MSG_DONTWAIT) > 0)
        ;
}

static void model_read(const struct model *m, uint64_t off, uint64_t len, unsigned char *out)
{
    memset(out, 0, len);
    for (uint64_t i = 0; i < len; i++) {
        uint64_t pos = off + i;
        if (pos < m->prefix_len) {
            out[i] = m->prefix[pos];
            continue;
        }
        for (size_t k = 0; k < m->n; k++) {
            const struct extent *x = &m->ext[k];
            if (pos >= x->offset && pos - x->offset < x->length) {
                uint64_t src = x->src + (pos - x->offset);
                out[i] = x->kind == EXT_SHARED ? shared_mem[src] : private_mem[src - (uintptr_t)private_mem];
                break;
            }
        }
    }
}

/* The one reply to a READ of handle fh: checked against the model when it is known. */
static void check_read(unsigned fh, uint64_t unique, uint64_t off, uint32_t size)
{
    size_t got = drain_kernel();
    const struct model *m = &models[fh];
    if (!m->registered) {
        assert(got == 0); /* forwarded to pyfuse3 */
        return;
    }
    struct fuse_out_header oh;
    assert(got >= sizeof oh);
    memcpy(&oh, drained, sizeof oh);
    assert(oh.unique == unique && oh.len == got);
    if (atomic_load(&E.gone)) {
        assert(oh.error == -EIO && got == sizeof oh);
        return;
    }
    assert(oh.error == 0);
    uint64_t len = off >= m->size ? 0 : m->size - off;
    if (len > size)
        len = size;
    if (len > MAX_REPLY)
        len = MAX_REPLY;
    assert(got == sizeof oh + len);
    if (!m->known)
        return;
    static unsigned char want[MAX_REPLY];
    model_read(m, off, len, want);
    if (memcmp(drained + sizeof oh, want, len) != 0) {
        fprintf(stderr, "read of handle %u at %#llx, %llu bytes: not the model's bytes\n", fh,
                (unsigned long long)off, (unsigned long long)len);
        abort();
    }
}

static void op_register(struct input *in)
{
    unsigned fh = take(in, 1) % HANDLES;
    unsigned flags = (unsigned)take(in, 1);
    struct model *m = &models[fh];
    struct model next = {.known = 1};
    next.prefix_len = take(in, 2) % sizeof next.prefix;
    for (size_t i = 0; i < next.prefix_len; i++)
        next.prefix[i] = (unsigned char)take(in, 1);
    next.n = take(in, 1) % 8;
    uint64_t end = next.prefix_len;
    for (size_t i = 0; i < next.n; i++) {
        struct extent *x = &next.ext[i];
        unsigned xf = (unsigned)take(in, 1);
        x->kind = xf & 1 ? EXT_PROCMEM : EXT_SHARED;
        x->fd = xf & 1 ? procmem_fd : memfd;
        if (xf & 0x80) { /* hostile */
            next.known = 0;
            x->offset = take(in, 8);
            x->length = take(in, 8);
            x->src = take(in, 8);
            if (xf & 0x40)
                x->kind = (enum extent_kind)(take(in, 1) % 6);
            continue;
        }
        x->offset = end + (xf & 2 ? take(in, 2) : take(in, 1) * PAGE);
        x->length = 1 + take(in, 4) % MEM;
        x->src = take(in, 4) % (MEM - x->length + 1);
        if (x->kind == EXT_PROCMEM)
            x->src += (uintptr_t)private_mem;
        end = x->offset + x->length;
    }
    next.size = flags & 0x80 ? take(in, 8) : end + take(in, 3);
    if (flags & 0x80)
        next.known = 0;
    const char *why;
    size_t bad;
    int err = engine_register(&E, fh, next.size, next.prefix, next.prefix_len, next.ext, next.n, 0, &why, &bad);
    if (err == 0) {
        next.registered = 1;
        *m = next;
    } else {
        assert(err == -EINVAL && why && (next.n == 0 || bad < next.n));
        assert(next.known == 0 || next.size < end); /* a well-formed layout is accepted */
    }
}

static void send_request(uint32_t opcode, uint64_t unique, const void *body, size_t body_len)
{
    struct fuse_in_header h = {.len = (uint32_t)(sizeof h + body_len), .opcode = opcode, .unique = unique};
    memcpy(E.rbuf, &h, sizeof h);
    memcpy(E.rbuf + sizeof h, body, body_len);
    handle_request(&E, E.rbuf, sizeof h + body_len);
}

static void run_op(struct input *in)
{
    switch (take(in, 1) % 9) {
    case 0: { /* raw request */
        size_t n = take(in, 2) % 8192;
        for (size_t i = 0; i < n; i++)
            E.rbuf[i] = (unsigned char)take(in, 1);
        handle_request(&E, E.rbuf, n);
        drain_kernel();
        drain_app();
        break;
    }
    case 1: { /* raw reply from pyfuse3 */
        size_t n = take(in, 2) % 8192;
        for (size_t i = 0; i < n; i++)
            E.abuf[i] = (unsigned char)take(in, 1);
        handle_reply(&E, E.abuf, n);
        drain_kernel();
        break;
    }
    case 2:
        op_register(in);
        break;
    case 3: {
        unsigned fh = take(in, 1) % HANDLES;
        assert(table_drop(&E, fh) == models[fh].registered);
        models[fh].registered = 0;
        break;
    }
    case 4:
        atomic_store(&E.gone, (int)(take(in, 1) & 1));
        break;
    case 5:
    case 6: { /* read */
        unsigned sel = (unsigned)take(in, 1);
        unsigned fh = sel % HANDLES;
        struct fuse_read_in r = {.fh = fh};
        const struct model *m = &models[fh];
        r.offset = sel & 0x80 ? take(in, 8) : take(in, 4) % (m->size + 100);
        r.size = sel & 0x40 ? (uint32_t)take(in, 4) : (uint32_t)(take(in, 3) % (MAX_REPLY + 9000));
        uint64_t unique = next_unique += 2;
        send_request(FUSE_READ, unique, &r, sizeof r);
        check_read(fh, unique, r.offset, r.size);
        drain_app();
        break;
    }
    case 7: { /* interrupt of a recent request, or of any */
        struct fuse_interrupt_in i = {.unique = take(in, 1) & 1 ? next_unique - 2 * (take(in, 1) % 4) : take(in, 8)};
        send_request(FUSE_INTERRUPT, i.unique | 1, &i, sizeof i);
        assert(drain_kernel() == 0); /* never answered */
        drain_app();
        break;
    }
    case 8: { /* FUSE_INIT and pyfuse3's reply to it */
        uint64_t unique = next_unique += 2;
        struct fuse_init_in init = {.major = 7, .minor = 38};
        send_request(FUSE_INIT, unique, &init, sizeof init);
        drain_app();
        struct {
            struct fuse_out_header oh;
            struct fuse_init_out out;
        } rep = {.oh = {.len = sizeof rep, .unique = unique},
                 .out = {.major = 7, .minor = 38, .flags = (uint32_t)take(in, 4), .max_pages = (uint16_t)take(in, 2)}};
        memcpy(E.abuf, &rep, sizeof rep);
        handle_reply(&E, E.abuf, sizeof rep);
        size_t got = drain_kernel();
        assert(got == sizeof rep);
        struct fuse_init_out out;
        memcpy(&out, drained + sizeof rep.oh, sizeof out);
        assert(!(out.flags & FUSE_MAX_PAGES) || E.pipe_slots < 2 || out.max_pages <= E.pipe_slots - 1);
        break;
    }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    for (int ops = 0; in.left && ops < 64; ops++)
        run_op(&in);
    for (unsigned fh = 0; fh < HANDLES; fh++) {
        table_drop(&E, fh);
        models[fh].registered = 0;
    }
    atomic_store(&E.gone, 0);
    drain_kernel();
    drain_app();
    return 0;
}
