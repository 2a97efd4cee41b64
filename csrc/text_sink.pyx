# cython: language_level=3
"""TextSink: a server stream's SSE chunks written by the engine client's reader, in C.

A plain streamed sequence (one per prompt, no logprobs, no stop strings, no tool calls, a
byte-level tokenizer, no --stream-interval-ms) sends the same SSE chunk every engine step but
for its new text. Once its first chunk has gone the usual way, the server attaches a TextSink
to its CompletionStream; then `take(streams, sinks, keys, tokens, finish)`, the reader's first
pass over each batch of engine steps, handles that stream's running tokens here: keeps them,
decodes their bytes (the detokenizer's table; an incomplete character waits for the next
batch), gives the text out as CompletionStream.news() would, adds the inter-token gaps to a
Tally, and writes one chunk per stream per batch: `prefix`, the text as a JSON string,
`suffix`, framed as an HTTP/1.1 chunk, in one write to the connection's transport (through the
ChunkWriter when that cannot take it now). No Python frame runs per token or per stream, and
the stream's own objects are left alone until the sink closes. Between two engine steps the
other processes evict a stream's objects from the cache: per stream and batch a sink reads
little else than its own struct (the tokens' bytes come from one shared table, the text given
out goes to its own buffer, not a list of strings), since each object touched is a miss. The entries it does not take
(other streams', finishes) are returned, in order, for OutputProcessor.process.

tests/test_text_sink.py checks its chunks against the Python path's (responses.text_event of
the detokenizer's text) byte for byte.
"""
import logging
import weakref

from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject

import numpy as np

cdef extern from "<sys/socket.h>" nogil:
    Py_ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_DONTWAIT, MSG_NOSIGNAL

cdef extern from "Python.h":
    object PyUnicode_DecodeUTF8Stateful(const char* s, Py_ssize_t size, const char* errors,
                                        Py_ssize_t* consumed)
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL

logger = logging.getLogger(__name__)

cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)  # time.monotonic's clock
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Tally:
    """Streamed tokens and the gaps between them, summed: metrics.TokenTally subclasses it
    with flush(), which writes the sums to the metrics and resets them; add() calls it every
    `flush_s` s. `bounds`: the gap histogram's bucket upper bounds (bisect_left's)."""

    cdef public long long tokens
    cdef public double gap_sum
    cdef public list gap_counts
    cdef public double due
    cdef double flush_s
    cdef double* bounds
    cdef Py_ssize_t n_bounds

    def __init__(self, bounds, double flush_s) -> None:
        self.n_bounds = len(bounds)
        self.bounds = <double*>realloc(self.bounds, self.n_bounds * sizeof(double))
        if self.bounds == NULL:
            raise MemoryError()
        for k, b in enumerate(bounds):
            self.bounds[k] = b
        self.tokens, self.gap_sum, self.gap_counts = 0, 0.0, [0] * self.n_bounds
        self.due, self.flush_s = 0.0, flush_s

    def __dealloc__(self):
        free(self.bounds)

    def add(self, long long tokens, gap, double now) -> None:
        """`tokens` streamed at `now`; with `gap` (not None), each came `gap` s after the one
        before."""
        self.tokens += tokens
        if gap is not None:
            self._gap(tokens, gap)
        self._due(now)

    cdef int _gap(self, long long tokens, double gap) except -1:
        cdef Py_ssize_t k = 0
        self.gap_sum += gap * tokens
        while k < self.n_bounds - 1 and self.bounds[k] < gap:  # bisect_left (last: +inf)
            k += 1
        self.gap_counts[k] += tokens
        return 0

    cdef int _due(self, double now) except -1:
        if now >= self.due:
            self.flush()
            self.due = now + self.flush_s
        return 0


cdef class ByteTable:
    """A detokenizer's table (bytes by token id) as one buffer and offsets: a token's bytes
    are read from shared, read-only memory, without touching (and reference-counting) its
    bytes object, which with random ids is a cache miss a token."""

    cdef char* data
    cdef Py_ssize_t* offsets   # token i's bytes: data[offsets[i]:offsets[i + 1]]
    cdef Py_ssize_t n
    cdef list table            # (kept alive: the cache is keyed by its id)

    def __init__(self, list table) -> None:
        cdef Py_ssize_t i, at = 0, size = 0
        self.table, self.n = table, len(table)
        for data in table:
            size += len(<bytes>data)
        self.data = <char*>malloc(max(size, 1))
        self.offsets = <Py_ssize_t*>malloc((self.n + 1) * sizeof(Py_ssize_t))
        if self.data == NULL or self.offsets == NULL:
            raise MemoryError()
        for i in range(self.n):
            self.offsets[i] = at
            memcpy(self.data + at, PyBytes_AS_STRING(table[i]), len(<bytes>table[i]))
            at += len(<bytes>table[i])
        self.offsets[self.n] = at

    def __dealloc__(self):
        free(self.data)
        free(self.offsets)


# tokenizer -> {id(table): its ByteTable} (a tokenizer has two tables: detokenizer.byte_tables)
_byte_tables = weakref.WeakKeyDictionary()


cdef ByteTable _byte_table(tokenizer, list table):
    tables = _byte_tables.setdefault(tokenizer, {})
    found = tables.get(id(table))
    if found is None:
        found = tables[id(table)] = ByteTable(table)
    return <ByteTable>found


cdef class TextSink:
    """Writes `stream`'s running tokens as chunks (see the module's docstring), registered
    under its `key` in `registry` (what take() looks sinks up in) until close(). The stream's
    state that only its own reads need -- the tokens and text given out, the detokenizer's
    incomplete character, the time of its last token (`last[index]`: the MetricsRecorder's,
    where the next gap starts) -- is kept here and written back by close(), which the stream
    calls as it leaves the sink (a finish, an abort, a release). `writer`: the response's
    ChunkWriter."""

    cdef object stream, key, writer
    cdef object transport      # the connection's (its write, buffer size, is_closing)
    cdef int fd                # its socket's, when a plain uvloop socket transport; else -1
    cdef bint queued           # the writer had chunks queued behind its task, when last seen
    cdef dict registry
    cdef list last
    cdef ByteTable table
    cdef Py_ssize_t index
    cdef bytes prefix, suffix
    cdef Tally tally
    cdef double last_time
    cdef char* buf             # the undecoded bytes: an incomplete character, this batch's
    cdef Py_ssize_t size, cap
    cdef int32_t* tokens       # tokens taken, not yet in stream.token_ids
    cdef Py_ssize_t n_tokens, tokens_cap
    cdef Py_ssize_t new_tokens  # of this batch
    cdef char* text            # the text given out (UTF-8), not yet in stream._given
    cdef Py_ssize_t text_size, text_cap
    cdef Py_ssize_t chars      # its characters, not yet in stream.sent_text
    cdef readonly bint closed

    def __init__(self, stream, dict registry, bytes prefix, bytes suffix, writer, list last,
                 Py_ssize_t index, Tally tally) -> None:
        self.stream, self.key, self.registry = stream, stream.key, registry
        self.table = _byte_table(stream.detok.tokenizer, stream.detok.table)
        self.prefix, self.suffix = prefix, suffix
        self.writer, self.queued = writer, writer._flusher is not None
        self.fd = -1
        if writer._cycle is not None:
            self.transport = writer._cycle.transport
            if type(self.transport) in _SOCKET_TRANSPORTS:  # (a plain socket's: not TLS's)
                sock = self.transport.get_extra_info("socket")
                self.fd = -1 if sock is None else sock.fileno()
        self.last, self.index, self.tally = last, index, tally
        self.last_time = last[index]
        data = <bytes>stream.detok.pending
        _extend(&self.buf, &self.size, &self.cap, PyBytes_AS_STRING(data), len(data))
        stream.detok.pending = b""
        registry[self.key] = self

    def __dealloc__(self):
        free(self.buf)
        free(self.tokens)
        free(self.text)

    def close(self) -> None:
        """Give the stream back its state, and leave the registry. Tokens of the batch being
        taken go back as not given out yet (undecoded): they come with the finish that closes
        the sink, in one output, as they would without it."""
        if self.closed:
            return
        self.closed = True
        if self.registry.get(self.key) is self:
            del self.registry[self.key]
        stream = self.stream
        stream.token_ids.extend([self.tokens[i] for i in range(self.n_tokens)])
        stream.sent_tokens = len(stream.token_ids) - self.new_tokens
        self.new_tokens = 0
        if self.text_size:  # (UTF-8 that this sink encoded: it decodes strictly)
            stream._given.append(self.text[:self.text_size].decode("utf-8"))
        stream.sent_text += self.chars
        stream.detok.pending = PyBytes_FromStringAndSize(self.buf, self.size)
        self.last[self.index] = self.last_time
        self.stream = self.writer = self.transport = None

    cdef int _push(self, int32_t token) except -1:
        if self.n_tokens == self.tokens_cap:
            tokens = <int32_t*>realloc(self.tokens, max(64, 2 * self.tokens_cap) * sizeof(int32_t))
            if tokens == NULL:
                raise MemoryError()
            self.tokens, self.tokens_cap = tokens, max(64, 2 * self.tokens_cap)
        self.tokens[self.n_tokens] = token
        self.n_tokens += 1
        self.new_tokens += 1
        cdef ByteTable table = self.table
        if 0 <= token < table.n:  # ids past the tokenizer's decode to nothing
            _extend(&self.buf, &self.size, &self.cap, table.data + table.offsets[token],
                    table.offsets[token + 1] - table.offsets[token])
        return 0

    cdef int _flush(self, double now) except -1:
        """The batch's text given out and written as a chunk; the gaps tallied."""
        cdef Py_ssize_t used = 0, n, chars, tokens = self.new_tokens
        cdef const char* s
        self.new_tokens = 0
        if _ascii(self.buf, self.size):  # its own text: no str made
            s, n, chars, used = self.buf, self.size, self.size, self.size
        else:
            text = PyUnicode_DecodeUTF8Stateful(self.buf, self.size, "replace", &used)
            s = PyUnicode_AsUTF8AndSize(text, &n)
            chars = PyUnicode_GET_LENGTH(text)
        self.chars += chars
        _extend(&self.text, &self.text_size, &self.text_cap, s, n)
        self.tally.tokens += tokens
        self.tally._gap(tokens, (now - self.last_time) / tokens)
        self.last_time = now
        self._write(s, n)
        memmove(self.buf, self.buf + used, self.size - used)  # an incomplete character
        self.size -= used
        return 0

    cdef int _write(self, const char* s, Py_ssize_t n) except -1:
        global _chunk, _chunk_cap
        cdef Py_ssize_t body, at, size, sent = 0
        cdef char head[24]
        body = len(self.prefix) + len(self.suffix) + 2 + _escaped_size(s, n)
        cdef int h = _hex_line(head, body)
        size = h + body + 2
        if size > _chunk_cap:
            grown = <char*>realloc(_chunk, size)
            if grown == NULL:
                raise MemoryError()
            _chunk, _chunk_cap = grown, size
        cdef char* out = _chunk
        memcpy(out, head, h)
        at = h
        memcpy(out + at, PyBytes_AS_STRING(self.prefix), len(self.prefix))
        at += len(self.prefix)
        out[at] = b'"'
        at = _escape(s, n, out, at + 1)
        out[at] = b'"'
        at += 1
        memcpy(out + at, PyBytes_AS_STRING(self.suffix), len(self.suffix))
        at += len(self.suffix)
        out[at] = b'\r'
        out[at + 1] = b'\n'
        # A direct write needs what ChunkWriter.write's does: no chunk queued behind its task,
        # the connection neither paused by flow control nor gone. The transport is asked (not
        # uvicorn's cycle and flow control: two more objects per chunk, out of cache): nothing
        # buffered (a paused connection has its high-water mark's worth), not closing (a gone
        # one is). Then the chunk goes to the socket itself (what uvloop's write would do first
        # with nothing buffered, without its Python call and bookkeeping); what the socket
        # does not take (it is full, or failed) goes to the transport's write, which buffers
        # it or meets the error as it would have. Otherwise the chunk goes through the writer,
        # which makes its own test.
        if self.queued:
            self.queued = self.writer._flusher is not None
        transport = self.transport
        if transport is not None and not self.queued \
                and transport.get_write_buffer_size() == 0 and not transport.is_closing():
            if self.fd >= 0:
                sent = max(0, send(self.fd, out, size, MSG_DONTWAIT | MSG_NOSIGNAL))
            if sent < size:
                transport.write(PyBytes_FromStringAndSize(out + sent, size - sent))
        else:
            self.writer.write(PyBytes_FromStringAndSize(out + h, body))
            self.queued = self.writer._flusher is not None
        return 0


cdef int _extend(char** buf, Py_ssize_t* size, Py_ssize_t* cap, const char* data,
                 Py_ssize_t n) except -1:
    """`data[:n]` appended to the growing buffer `buf` (`size` bytes used of `cap`)."""
    cdef Py_ssize_t want = cap[0]
    cdef char* grown
    if n == 0:
        return 0
    if size[0] + n > want:
        while want < size[0] + n:
            want = max(64, 2 * want)
        grown = <char*>realloc(buf[0], want)
        if grown == NULL:
            raise MemoryError()
        buf[0], cap[0] = grown, want
    memcpy(buf[0] + size[0], data, n)
    size[0] += n
    return 0


cdef inline bint _ascii(const char* s, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if <unsigned char>s[i] >= 0x80:
            return False
    return True


# the chunk being written (one at a time: the reader's thread), its room
cdef char* _chunk = NULL
cdef Py_ssize_t _chunk_cap = 0
try:
    import uvloop.loop
    _SOCKET_TRANSPORTS = (uvloop.loop.TCPTransport, uvloop.loop.UnixTransport)
except ImportError:  # asyncio's event loop: every chunk goes through the transport's write
    _SOCKET_TRANSPORTS = ()


cdef int _hex_line(char* out, Py_ssize_t n) noexcept:
    """`n` in hex and CRLF, as b"%x\\r\\n" % n (snprintf's formatting costs more than the
    rest of a chunk); returns its length."""
    cdef int digits = 1, i
    while (n >> (4 * digits)) and digits < 16:
        digits += 1
    for i in range(digits):
        out[digits - 1 - i] = _HEX[(n >> (4 * i)) & 15]
    out[digits] = b'\r'
    out[digits + 1] = b'\n'
    return digits + 2


cdef Py_ssize_t _escaped_size(const char* s, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i = 0, size = 0
    cdef unsigned char c
    while i < n:
        c = s[i]
        if c == b'"' or c == b'\\' or c == b'\n' or c == b'\r' or c == b'\t' or c == 8 \
                or c == 12:
            size += 2
        elif c < 0x20:
            size += 6
        elif _line_break(s, n, i):
            size += 6
            i += 1 if c == 0xC2 else 2
        else:
            size += 1
        i += 1
    return size


cdef inline bint _line_break(const char* s, Py_ssize_t n, Py_ssize_t i) noexcept:
    """U+0085, U+2028 or U+2029 at s[i] (responses._LINE_BREAKS: escaped in SSE events)."""
    cdef unsigned char c = s[i]
    if c == 0xC2:
        return i + 1 < n and <unsigned char>s[i + 1] == 0x85
    return (c == 0xE2 and i + 2 < n and <unsigned char>s[i + 1] == 0x80
            and (<unsigned char>s[i + 2] == 0xA8 or <unsigned char>s[i + 2] == 0xA9))


cdef const char* _HEX = b"0123456789abcdef"


cdef Py_ssize_t _escape(const char* s, Py_ssize_t n, char* out, Py_ssize_t at) noexcept:
    """The UTF-8 `s` escaped as json.encoder.encode_basestring does (quotes, backslashes,
    control characters; other characters as they are), then U+0085/U+2028/U+2029 as \\uXXXX:
    responses._text's bytes without its quotes. Returns the end."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c
    cdef unsigned int code
    while i < n:
        c = s[i]
        if c == b'"' or c == b'\\':
            out[at] = b'\\'
            out[at + 1] = c
            at += 2
        elif c == b'\n' or c == b'\r' or c == b'\t' or c == 8 or c == 12:
            out[at] = b'\\'
            out[at + 1] = (b'n' if c == b'\n' else b'r' if c == b'\r' else b't' if c == b'\t'
                           else b'b' if c == 8 else b'f')
            at += 2
        elif c < 0x20 or _line_break(s, n, i):
            if c < 0x20:
                code = c
            elif c == 0xC2:
                code, i = 0x85, i + 1
            else:
                code, i = 0x2000 | (<unsigned char>s[i + 2] & 0x2F), i + 2
            out[at] = b'\\'
            out[at + 1] = b'u'
            out[at + 2] = _HEX[code >> 12]
            out[at + 3] = _HEX[(code >> 8) & 15]
            out[at + 4] = _HEX[(code >> 4) & 15]
            out[at + 5] = _HEX[code & 15]
            at += 6
        else:
            out[at] = c
            at += 1
        i += 1
    return at


def take(dict streams, dict sinks, const uint64_t[:] keys, const int32_t[:] tokens,
         const uint8_t[:] finish):
    """A batch's entries of the streams with a sink (in `sinks`, by key), applied (see the
    module's docstring): the indices of the others, in order, as an array (those of keys not
    in `streams` left out), or None when it took none. A sink's stream whose entry is left
    (its finish) has its sink closed first."""
    cdef Py_ssize_t n = keys.shape[0], i, left = 0
    cdef PyObject* found
    cdef TextSink sink
    cdef list touched = []
    if not sinks:
        return None
    rest = np.empty(n, dtype=np.int64)
    cdef long long[::1] rest_view = rest
    cdef double now = _now()
    for i in range(n):
        key = keys[i]
        # (a stream leaves `streams` only through its sink's close(): one with a sink is in)
        found = PyDict_GetItem(sinks, key)
        if found != NULL:
            sink = <TextSink>found
            if not finish[i] and tokens[i] >= 0:
                if sink.new_tokens == 0:
                    touched.append(sink)
                sink._push(tokens[i])
                continue
            sink.close()
        elif PyDict_GetItem(streams, key) == NULL:
            continue  # released, or finished by a stop string: stragglers
        rest_view[left] = i
        left += 1
    if not touched:
        return None
    for sink in touched:
        if sink.new_tokens:  # (not closed meanwhile)
            _flush(sink, now)
    (<TextSink>touched[0]).tally._due(now)
    return rest[:left]


cdef void _flush(TextSink sink, double now):
    try:
        sink._flush(now)
    except Exception:  # the reader serves every request: one stream's failure stays there
        logger.exception("a stream's text sink failed")
