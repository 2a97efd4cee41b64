/* minivllm-client: submit one request to a minivllm engine's ZeroMQ endpoint and print its
 * tokens as they stream.
 *
 * It speaks ipc/PROTOCOL.md with nothing but ipc/minivllm_ipc.h and libzmq: a DEALER socket,
 * one record per frame. Every received frame is checked against its own length before any
 * field is trusted, so a broken or hostile server can make it report "malformed" but never
 * read out of bounds.
 *
 * Output: stdout gets "token <id>" per new token (with --logprobs also its logprob and the top
 * "<id>:<logprob>" pairs), then "finish <reason>". Exit status: 0 finished, 1 usage or system
 * error, 2 the engine answered an error record, 3 timed out, 130 interrupted (SIGINT/SIGTERM:
 * the request is aborted first).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

#include "minivllm_ipc.h"

/* The records are little-endian and this client builds them from native structs. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "minivllm-client writes records from native structs: build it on a little-endian host"
#endif

enum { EXIT_DONE = 0, EXIT_USAGE = 1, EXIT_ENGINE_ERROR = 2, EXIT_TIMEOUT = 3,
       EXIT_INTERRUPTED = 130 };

static const char USAGE[] =
    "usage: minivllm-client [options] [--] TOKEN_ID...\n"
    "       minivllm-client [options] --prompt-file PATH   (whitespace-separated ids; - = stdin)\n"
    "\n"
    "  --endpoint URL             engine ROUTER endpoint (default tcp://127.0.0.1:5557)\n"
    "  --request-id N             id of the request on this connection (default 1)\n"
    "  --max-tokens N             tokens to generate, 0 = until the context is full (default 16)\n"
    "  --min-tokens N             tokens before EOS or a stop id may end it (default 0)\n"
    "  --temperature X            0 = greedy (default 1)\n"
    "  --top-p X                  (default 1)\n"
    "  --top-k N                  -1 = off (default -1)\n"
    "  --min-p X                  (default 0)\n"
    "  --repetition-penalty X     1 = off (default 1)\n"
    "  --presence-penalty X       (default 0)\n"
    "  --frequency-penalty X      (default 0)\n"
    "  --seed N                   unsigned 64-bit sampling seed (default: none)\n"
    "  --ignore-eos               keep generating past EOS\n"
    "  --stop-token-id N          end the request on this token id (repeatable)\n"
    "  --logprobs N               print the sampled token's logprob and the top N, N in [0, 20]\n"
    "  --priority N               lower is served first under the priority policy (default 0)\n"
    "  --json-schema JSON         constrain the output to this JSON schema (at most one of\n"
    "                             --json-schema, --regex, --choice, --grammar, --json-object)\n"
    "  --regex RE                 constrain the output to match RE\n"
    "  --choice JSON              the output is one of a JSON array of strings\n"
    "  --grammar EBNF             constrain the output to an EBNF grammar (rule root)\n"
    "  --json-object              the output is a JSON object\n"
    "  --timeout-ms N             give up when no token arrives for N ms (default 30000)\n"
    "  --curve-server-key KEY     CURVE: the engine's public key, 40 Z85 characters or its\n"
    "                             certificate file (NAME.key)\n"
    "  --curve-client-key FILE    CURVE: this client's certificate with its secret key\n"
    "                             (NAME.key_secret); its public key must be allowed by the engine\n"
    "\n"
    "exit status: 0 finished, 1 usage or system error, 2 engine error record, 3 timeout,\n"
    "130 interrupted (the request is aborted first)\n";

static void die(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("minivllm-client: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(status);
}

/* ---- arguments ------------------------------------------------------------------------- */

/* A growable array of int32 token ids. */
typedef struct ids {
    int32_t *v;
    size_t n, cap;
} ids;

static void ids_push(ids *a, int32_t x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 64;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) die(EXIT_USAGE, "out of memory");
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
}

/* strto* alone stops quietly at trailing garbage and clamps on overflow; every number on the
 * command line goes through these checks so that a typo is an error, not a different value. */
static int32_t parse_i32(const char *what, const char *s, int32_t lo, int32_t hi) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        die(EXIT_USAGE, "%s: '%s' is not an integer in [%" PRId32 ", %" PRId32 "]", what, s,
            lo, hi);
    return (int32_t)v;
}

static uint64_t parse_u64(const char *what, const char *s) {
    char *end;
    errno = 0;
    /* strtoull would silently negate "-1" into 2^64 - 1. */
    unsigned long long v = s[0] == '-' ? 0 : strtoull(s, &end, 10);
    if (s[0] == '-' || errno || end == s || *end)
        die(EXIT_USAGE, "%s: '%s' is not an unsigned 64-bit integer", what, s);
    return (uint64_t)v;
}

static double parse_double(const char *what, const char *s) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end) die(EXIT_USAGE, "%s: '%s' is not a number", what, s);
    return v;
}

static void read_prompt_file(const char *path, ids *prompt) {
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "r");
    if (!f) die(EXIT_USAGE, "--prompt-file %s: %s", path, strerror(errno));
    char word[32];
    int c;
    size_t len = 0;
    /* One token per whitespace-separated word; a word too long for any int32 is an error. */
    do {
        c = fgetc(f);
        if (c == EOF || c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            if (len) {
                word[len] = '\0';
                ids_push(prompt, parse_i32("--prompt-file token id", word, INT32_MIN, INT32_MAX));
                len = 0;
            }
        } else if (len + 1 < sizeof word) {
            word[len++] = (char)c;
        } else {
            die(EXIT_USAGE, "--prompt-file %s: a token id longer than %zu characters", path,
                sizeof word - 1);
        }
    } while (c != EOF);
    if (ferror(f)) die(EXIT_USAGE, "--prompt-file %s: read error", path);
    if (f != stdin) fclose(f);
}

typedef struct options {
    const char *endpoint;
    uint64_t request_id;
    mv_sampling sampling;
    ids prompt, stop;
    long long timeout_ms;
    const char *curve_server, *curve_client;
    uint32_t structured_kind; /* MV_STRUCTURED_*, 0 = none */
    const char *structured_spec;
} options;

static void set_structured(options *o, const char *flag, uint32_t kind, const char *spec) {
    if (o->structured_kind) die(EXIT_USAGE, "%s: the output takes one constraint", flag);
    if (strlen(spec) > MV_MAX_SPEC_BYTES)
        die(EXIT_USAGE, "%s: longer than %u bytes", flag, MV_MAX_SPEC_BYTES);
    o->structured_kind = kind;
    o->structured_spec = spec;
}

static void parse_args(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    o->endpoint = "tcp://127.0.0.1:5557";
    o->request_id = 1;
    o->timeout_ms = 30000;
    /* SamplingParams' defaults, so the same flags mean the same request as from Python. */
    mv_sampling *s = &o->sampling;
    s->temperature = 1.0;
    s->top_p = 1.0;
    s->repetition_penalty = 1.0;
    s->top_k = -1;
    s->max_tokens = 16;
    s->logprobs = -1;
    const char *prompt_file = NULL;
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (strncmp(a, "--", 2) != 0) break; /* the first token id */
        if (strcmp(a, "--help") == 0) {
            fputs(USAGE, stdout);
            exit(EXIT_DONE);
        }
        if (strcmp(a, "--json-object") == 0) {
            set_structured(o, a, MV_STRUCTURED_JSON_OBJECT, "");
            continue;
        }
        if (strcmp(a, "--ignore-eos") == 0) {
            s->flags |= MV_SAMPLING_IGNORE_EOS;
            continue;
        }
        if (i + 1 >= argc) die(EXIT_USAGE, "%s needs a value (see --help)", a);
        const char *v = argv[++i];
        if (strcmp(a, "--endpoint") == 0) o->endpoint = v;
        else if (strcmp(a, "--request-id") == 0) o->request_id = parse_u64(a, v);
        else if (strcmp(a, "--max-tokens") == 0) s->max_tokens = parse_i32(a, v, 0, INT32_MAX);
        else if (strcmp(a, "--min-tokens") == 0) s->min_tokens = parse_i32(a, v, 0, INT32_MAX);
        else if (strcmp(a, "--temperature") == 0) s->temperature = parse_double(a, v);
        else if (strcmp(a, "--top-p") == 0) s->top_p = parse_double(a, v);
        else if (strcmp(a, "--top-k") == 0) s->top_k = parse_i32(a, v, INT32_MIN, INT32_MAX);
        else if (strcmp(a, "--min-p") == 0) s->min_p = parse_double(a, v);
        else if (strcmp(a, "--repetition-penalty") == 0) s->repetition_penalty = parse_double(a, v);
        else if (strcmp(a, "--presence-penalty") == 0) s->presence_penalty = parse_double(a, v);
        else if (strcmp(a, "--frequency-penalty") == 0) s->frequency_penalty = parse_double(a, v);
        else if (strcmp(a, "--seed") == 0) {
            s->seed = parse_u64(a, v);
            s->flags |= MV_SAMPLING_HAS_SEED;
        } else if (strcmp(a, "--stop-token-id") == 0)
            ids_push(&o->stop, parse_i32(a, v, INT32_MIN, INT32_MAX));
        else if (strcmp(a, "--logprobs") == 0)
            s->logprobs = parse_i32(a, v, 0, MV_MAX_TOP_LOGPROBS);
        else if (strcmp(a, "--priority") == 0) s->priority = parse_i32(a, v, INT32_MIN, INT32_MAX);
        else if (strcmp(a, "--prompt-file") == 0) prompt_file = v;
        else if (strcmp(a, "--timeout-ms") == 0) o->timeout_ms = parse_i32(a, v, 1, INT32_MAX);
        else if (strcmp(a, "--curve-server-key") == 0) o->curve_server = v;
        else if (strcmp(a, "--curve-client-key") == 0) o->curve_client = v;
        else if (strcmp(a, "--json-schema") == 0) set_structured(o, a, MV_STRUCTURED_JSON, v);
        else if (strcmp(a, "--regex") == 0) set_structured(o, a, MV_STRUCTURED_REGEX, v);
        else if (strcmp(a, "--choice") == 0) set_structured(o, a, MV_STRUCTURED_CHOICE, v);
        else if (strcmp(a, "--grammar") == 0) set_structured(o, a, MV_STRUCTURED_GRAMMAR, v);
        else die(EXIT_USAGE, "unknown option %s (see --help)", a);
    }
    if (prompt_file) {
        if (i < argc) die(EXIT_USAGE, "give the prompt as arguments or --prompt-file, not both");
        read_prompt_file(prompt_file, &o->prompt);
    }
    for (; i < argc; i++)
        ids_push(&o->prompt, parse_i32("token id", argv[i], INT32_MIN, INT32_MAX));
    if (o->prompt.n == 0) die(EXIT_USAGE, "no prompt token ids (see --help)");
    if (!o->curve_server != !o->curve_client)
        die(EXIT_USAGE, "--curve-server-key and --curve-client-key go together");
}

/* ---- CURVE keys ------------------------------------------------------------------------ */

enum { Z85_KEY_LEN = 40 };

/* The Z85 key `name` ("public-key" or "secret-key") from a ZeroMQ certificate file, whose
 * lines read `    name = "<40 characters>"`; or `arg` itself when it is a 40-character key. */
static void read_key(const char *arg, const char *name, char out[Z85_KEY_LEN + 1]) {
    FILE *f = fopen(arg, "r");
    if (!f) {
        if (strlen(arg) != Z85_KEY_LEN || strcmp(name, "public-key") != 0)
            die(EXIT_USAGE, "%s: %s", arg, strerror(errno));
        memcpy(out, arg, Z85_KEY_LEN + 1);
        return;
    }
    char line[256];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        char *p = line + strspn(line, " \t");
        if (strncmp(p, name, strlen(name)) != 0) continue;
        p += strlen(name);
        p += strspn(p, " \t");
        if (*p++ != '=') continue;
        p += strspn(p, " \t");
        if (*p++ != '"' || strlen(p) < Z85_KEY_LEN + 1 || p[Z85_KEY_LEN] != '"') continue;
        memcpy(out, p, Z85_KEY_LEN);
        out[Z85_KEY_LEN] = '\0';
        found = 1;
    }
    fclose(f);
    if (!found) die(EXIT_USAGE, "%s holds no %s = \"<40 Z85 characters>\" line", arg, name);
}

/* Make `sock` a CURVE client of the engine whose public key is o->curve_server. */
static void set_curve(void *sock, const options *o) {
    if (!zmq_has("curve")) die(EXIT_USAGE, "this libzmq was built without CURVE support");
    char server[Z85_KEY_LEN + 1], public_key[Z85_KEY_LEN + 1], secret[Z85_KEY_LEN + 1];
    read_key(o->curve_server, "public-key", server);
    read_key(o->curve_client, "public-key", public_key);
    read_key(o->curve_client, "secret-key", secret);
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server, Z85_KEY_LEN + 1) != 0
        || zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, public_key, Z85_KEY_LEN + 1) != 0
        || zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, secret, Z85_KEY_LEN + 1) != 0)
        die(EXIT_USAGE, "CURVE keys: %s", zmq_strerror(zmq_errno()));
    memset(secret, 0, sizeof secret);
}

/* ---- records --------------------------------------------------------------------------- */

static uint64_t pad8(uint64_t n) { return (n + 7) & ~(uint64_t)7; }

static mv_header make_header(uint32_t kind, uint64_t size, uint32_t flags) {
    mv_header h;
    memset(&h, 0, sizeof h);
    h.magic = MV_MAGIC;
    h.version = MV_VERSION;
    h.kind = (uint16_t)kind;
    h.size = (uint32_t)size;
    h.flags = flags;
    return h;
}

/* The submit record: the fixed part, prompt ids, stop ids, zero padding to 8; then, for a
 * constrained output, the mv_structured part and its spec, zero padded to 8. */
static unsigned char *encode_submit(const options *o, size_t *size_out) {
    /* 64-bit arithmetic: two counts near 2^32 cannot wrap the size check. */
    uint64_t body = (uint64_t)sizeof(mv_submit) + 4 * ((uint64_t)o->prompt.n + o->stop.n);
    uint64_t ids_end = pad8(body), spec_len = 0;
    uint64_t size = ids_end;
    if (o->structured_kind) {
        spec_len = strlen(o->structured_spec);
        size += sizeof(mv_structured) + pad8(spec_len);
    }
    if (size > MV_MAX_RECORD_BYTES)
        die(EXIT_USAGE, "%zu prompt and %zu stop ids make a %" PRIu64 "-byte record; the limit "
            "is %u", o->prompt.n, o->stop.n, size, MV_MAX_RECORD_BYTES);
    unsigned char *buf = calloc(1, size); /* calloc: the padding goes out as zeros */
    if (!buf) die(EXIT_USAGE, "out of memory");
    mv_submit rec;
    memset(&rec, 0, sizeof rec);
    rec.header = make_header(MV_KIND_SUBMIT, size,
                             o->structured_kind ? MV_SUBMIT_HAS_STRUCTURED : 0);
    rec.request_id = o->request_id;
    rec.sampling = o->sampling;
    rec.num_prompt_tokens = (uint32_t)o->prompt.n;
    rec.num_stop_token_ids = (uint32_t)o->stop.n;
    memcpy(buf, &rec, sizeof rec);
    if (o->prompt.n) memcpy(buf + sizeof rec, o->prompt.v, 4 * o->prompt.n);
    if (o->stop.n) memcpy(buf + sizeof rec + 4 * o->prompt.n, o->stop.v, 4 * o->stop.n);
    if (o->structured_kind) {
        mv_structured part = {o->structured_kind, (uint32_t)spec_len};
        memcpy(buf + ids_end, &part, sizeof part);
        memcpy(buf + ids_end + sizeof part, o->structured_spec, spec_len);
    }
    *size_out = size;
    return buf;
}

static int send_abort(void *sock, uint64_t request_id) {
    mv_abort rec;
    memset(&rec, 0, sizeof rec);
    rec.header = make_header(MV_KIND_ABORT, sizeof rec, 0);
    rec.request_id = request_id;
    return zmq_send(sock, &rec, sizeof rec, ZMQ_DONTWAIT) == (int)sizeof rec ? 0 : -1;
}

/* Frames come from zmq_msg_data, which promises no alignment: every field is copied out with
 * memcpy rather than read through a cast pointer. */
static uint64_t load_u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static int32_t load_i32(const unsigned char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static float load_f32(const unsigned char *p) { float v; memcpy(&v, p, 4); return v; }

/* What one frame meant for our request. */
typedef enum {
    FRAME_OTHER,     /* nothing for our request (another request's entries or error) */
    FRAME_PROGRESS,  /* new tokens of ours */
    FRAME_FINISHED,  /* our request ended */
    FRAME_ERROR,     /* an error record about our request */
    FRAME_MALFORMED, /* not a valid record: reported, skipped */
} frame_result;

static frame_result malformed(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("malformed frame: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return FRAME_MALFORMED;
}

static const char *finish_name(unsigned reason) {
    switch (reason) {
    case MV_FINISH_STOP: return "stop";
    case MV_FINISH_LENGTH: return "length";
    case MV_FINISH_ABORT: return "abort";
    default: return NULL;
    }
}

static frame_result on_step_output(const unsigned char *p, size_t n, const mv_header *h,
                                   uint64_t request_id, int want_logprobs) {
    mv_step_output rec;
    if (n < sizeof rec) return malformed("step output of %zu bytes", n);
    if (h->flags & ~MV_STEP_HAS_LOGPROBS)
        return malformed("step output with unknown flags 0x%x", h->flags);
    memcpy(&rec, p, sizeof rec);
    uint64_t m = rec.num_entries, k = rec.num_top_logprobs;
    int has_lp = (h->flags & MV_STEP_HAS_LOGPROBS) != 0;
    if (k > MV_MAX_TOP_LOGPROBS || (k && !has_lp))
        return malformed("step output announces %" PRIu64 " top logprobs per token", k);
    /* The array offsets of PROTOCOL.md; m < 2^32 and k <= 20 keep every term far from
     * overflowing 64 bits, and the total must equal the frame length exactly. */
    uint64_t o_tok = sizeof rec + 8 * m;
    uint64_t o_fin = o_tok + pad8(4 * m);
    uint64_t o_lp = o_fin + pad8(m);
    uint64_t o_tid = o_lp + pad8(4 * m);
    uint64_t o_tlp = o_tid + pad8(4 * m * k);
    uint64_t size = has_lp ? o_tlp + pad8(4 * m * k) : o_lp;
    if (size != n)
        return malformed("step output of %zu bytes cannot hold the %" PRIu64 " entries it "
                         "announces", n, m);
    frame_result result = FRAME_OTHER;
    for (uint64_t i = 0; i < m; i++) {
        if (load_u64(p + sizeof rec + 8 * i) != request_id) continue; /* not ours */
        int32_t token = load_i32(p + o_tok + 4 * i);
        unsigned reason = p[o_fin + i];
        result = FRAME_PROGRESS;
        /* -1 is "no token": an entry that only carries its finish reason. */
        if (token >= 0) {
            printf("token %" PRId32, token);
            if (want_logprobs && has_lp) {
                printf(" %.9g", (double)load_f32(p + o_lp + 4 * i));
                for (uint64_t j = 0; j < k; j++) {
                    int32_t top = load_i32(p + o_tid + 4 * (i * k + j));
                    if (top >= 0) /* -1 pads past the top-N this request asked for */
                        printf(" %" PRId32 ":%.9g", top,
                               (double)load_f32(p + o_tlp + 4 * (i * k + j)));
                }
            }
            putchar('\n');
        }
        if (reason != MV_FINISH_NONE) {
            const char *name = finish_name(reason);
            if (name) printf("finish %s\n", name);
            else printf("finish reason-%u\n", reason); /* a reason newer than this client */
            return FRAME_FINISHED;
        }
    }
    return result;
}

static frame_result on_error(const unsigned char *p, size_t n, const mv_header *h,
                             uint64_t request_id) {
    mv_error rec;
    if (n < sizeof rec) return malformed("error record of %zu bytes", n);
    if (h->flags & ~MV_ERROR_HAS_REQUEST)
        return malformed("error record with unknown flags 0x%x", h->flags);
    memcpy(&rec, p, sizeof rec);
    if (pad8((uint64_t)sizeof rec + rec.message_len) != n)
        return malformed("error record of %zu bytes cannot hold a %u-byte message", n,
                         rec.message_len);
    /* Another request's error is not ours; one without a request is about our only submit. */
    if ((h->flags & MV_ERROR_HAS_REQUEST) && rec.request_id != request_id) return FRAME_OTHER;
    fprintf(stderr, "error %u ", rec.code);
    /* The message is the server's bytes: control characters would reach the terminal. */
    for (uint32_t i = 0; i < rec.message_len; i++) {
        unsigned char c = p[sizeof rec + i];
        fputc(c < 0x20 || c == 0x7f ? '?' : c, stderr);
    }
    fputc('\n', stderr);
    return FRAME_ERROR;
}

static frame_result on_frame(const unsigned char *p, size_t n, uint64_t request_id,
                             int want_logprobs) {
    mv_header h;
    if (n < sizeof h) return malformed("%zu bytes, shorter than a record header", n);
    memcpy(&h, p, sizeof h);
    if (h.magic != MV_MAGIC) return malformed("bad magic 0x%08x", h.magic);
    if (h.version < MV_MIN_VERSION || h.version > MV_VERSION)
        return malformed("unsupported version %u", h.version);
    if (h.size != n) return malformed("header says %u bytes, the frame holds %zu", h.size, n);
    if (n % 8 || n > MV_MAX_RECORD_BYTES) return malformed("record size %zu", n);
    switch (h.kind) {
    case MV_KIND_STEP_OUTPUT: return on_step_output(p, n, &h, request_id, want_logprobs);
    case MV_KIND_ERROR: return on_error(p, n, &h, request_id);
    default: return malformed("record kind %u is not one an engine sends", h.kind);
    }
}

/* ---- main loop ------------------------------------------------------------------------- */

/* Self-pipe: the signal handler writes a byte that zmq_poll sees, so a signal that lands
 * between the flag check and the poll still wakes it at once. */
static int signal_pipe[2] = {-1, -1};
static volatile sig_atomic_t interrupts;

static void on_signal(int sig) {
    (void)sig;
    int saved = errno;
    interrupts++;
    ssize_t w = write(signal_pipe[1], "", 1); /* a full pipe already holds a wake-up */
    (void)w;
    errno = saved;
}

static void install_signal_handlers(void) {
    if (pipe(signal_pipe) != 0) die(EXIT_USAGE, "pipe: %s", strerror(errno));
    for (int i = 0; i < 2; i++) {
        fcntl(signal_pipe[i], F_SETFL, fcntl(signal_pipe[i], F_GETFL) | O_NONBLOCK);
        fcntl(signal_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    options o;
    parse_args(argc, argv, &o);
    install_signal_handlers();

    void *ctx = zmq_ctx_new();
    void *sock = ctx ? zmq_socket(ctx, ZMQ_DEALER) : NULL;
    if (!sock) die(EXIT_USAGE, "zmq: %s", zmq_strerror(zmq_errno()));
    /* libzmq drops a peer whose message exceeds this before allocating it. */
    int64_t max_msg = MV_MAX_RECORD_BYTES;
    int linger_ms = 1000; /* long enough to deliver an abort, short enough not to hang exit */
    /* Immediate: frames go only to a live connection, so an engine that is down shows as a
     * submit that cannot be sent (a timeout below), not as a frame queued for nobody. */
    int immediate = 1;
    zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg);
    zmq_setsockopt(sock, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    zmq_setsockopt(sock, ZMQ_IMMEDIATE, &immediate, sizeof immediate);
    if (o.curve_server) set_curve(sock, &o);
    if (zmq_connect(sock, o.endpoint) != 0)
        die(EXIT_USAGE, "connect %s: %s", o.endpoint, zmq_strerror(zmq_errno()));

    size_t size;
    unsigned char *submit = encode_submit(&o, &size);
    zmq_pollitem_t ready[2] = {{sock, 0, ZMQ_POLLOUT, 0},
                               {NULL, signal_pipe[0], ZMQ_POLLIN, 0}};
    int rc = zmq_poll(ready, 2, (long)o.timeout_ms);
    if (rc < 0 && zmq_errno() != EINTR) die(EXIT_USAGE, "poll: %s", zmq_strerror(zmq_errno()));
    if (interrupts || rc <= 0) { /* nothing was sent, so there is nothing to abort */
        if (!interrupts)
            fprintf(stderr, "timeout: cannot reach the engine at %s in %lld ms%s\n",
                    o.endpoint, o.timeout_ms,
                    o.curve_server ? " (CURVE: is this client's public key allowed, and the "
                                     "server key the engine's?)" : "");
        free(submit);
        zmq_close(sock);
        zmq_ctx_term(ctx);
        return interrupts ? EXIT_INTERRUPTED : EXIT_TIMEOUT;
    }
    if (zmq_send(sock, submit, size, ZMQ_DONTWAIT) != (int)size)
        die(EXIT_USAGE, "send: %s", zmq_strerror(zmq_errno()));
    free(submit);

    int status = -1, aborted = 0;
    long long deadline = now_ms() + o.timeout_ms;
    int want_logprobs = o.sampling.logprobs >= 0;
    while (status < 0) {
        if (interrupts && !aborted) {
            /* Tell the engine to stop, then wait (within the timeout) for its finish entry. */
            aborted = 1;
            fprintf(stderr, "interrupted: aborting request %" PRIu64 "\n", o.request_id);
            if (send_abort(sock, o.request_id) != 0) status = EXIT_INTERRUPTED;
            deadline = now_ms() + o.timeout_ms;
            continue;
        }
        if (interrupts > 1) { /* a second signal: stop waiting */
            status = EXIT_INTERRUPTED;
            break;
        }
        long long wait = deadline - now_ms();
        if (wait <= 0) {
            fprintf(stderr, "timeout: no token of request %" PRIu64 " for %lld ms\n",
                    o.request_id, o.timeout_ms);
            /* Best effort, so a live but slow engine does not generate for no one. */
            if (!aborted) send_abort(sock, o.request_id);
            status = aborted ? EXIT_INTERRUPTED : EXIT_TIMEOUT;
            break;
        }
        zmq_pollitem_t items[2] = {{sock, 0, ZMQ_POLLIN, 0},
                                   {NULL, signal_pipe[0], ZMQ_POLLIN, 0}};
        rc = zmq_poll(items, 2, (long)wait);
        if (rc < 0 && zmq_errno() != EINTR) die(EXIT_USAGE, "poll: %s", zmq_strerror(zmq_errno()));
        if (items[1].revents & ZMQ_POLLIN) {
            char drain[16];
            while (read(signal_pipe[0], drain, sizeof drain) > 0) {}
        }
        if (rc <= 0 || !(items[0].revents & ZMQ_POLLIN)) continue;

        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            if (zmq_errno() == EAGAIN || zmq_errno() == EINTR) continue;
            die(EXIT_USAGE, "recv: %s", zmq_strerror(zmq_errno()));
        }
        frame_result r;
        if (zmq_msg_more(&msg)) {
            /* One record per message: a multipart message is consumed whole and rejected. */
            int parts = 1;
            while (zmq_msg_more(&msg) && zmq_msg_recv(&msg, sock, 0) >= 0) parts++;
            r = malformed("a message of %d frames; records travel one per message", parts);
        } else {
            r = on_frame(zmq_msg_data(&msg), zmq_msg_size(&msg), o.request_id, want_logprobs);
        }
        zmq_msg_close(&msg);
        fflush(stdout); /* stream: the frame's tokens are visible as soon as they arrive */
        switch (r) {
        case FRAME_PROGRESS: deadline = now_ms() + o.timeout_ms; break;
        case FRAME_FINISHED: status = aborted ? EXIT_INTERRUPTED : EXIT_DONE; break;
        case FRAME_ERROR: status = EXIT_ENGINE_ERROR; break;
        case FRAME_OTHER:
        case FRAME_MALFORMED: break; /* no progress of ours: the timeout keeps running */
        }
    }
    fflush(stdout);
    zmq_close(sock); /* lingers (at most linger_ms) only while an abort is still queued */
    zmq_ctx_term(ctx);
    free(o.prompt.v);
    free(o.stop.v);
    return status;
}
