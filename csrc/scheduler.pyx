# cython: language_level=3
"""The scheduler's policy compiled: continuous batching over C data, for the engine's step loop.

The readable specification is minivllm/core/scheduler_ref.py (with core/request.py): this module
must behave exactly like it -- the same batches, admissions, results, block tables and
preemptions for any sequence of calls; tests/test_scheduler.py drives both side by side. Read the
reference first; comments here explain how the C version gets the same result without
per-request Python work.

How the state is kept
- `Request` is a cdef class with the reference's attribute names. What the step loops read (token
  counts, req_index, priority, stop ids, the token buffer) are C fields; the Python-facing objects
  (params, the numpy token buffer) ride along for the engine.
- The waiting and running queues are C ring buffers of *borrowed* Request pointers. The owning
  references live in the dict `_requests` (id -> Request; `requests` is a read-only view), which
  holds every unfinished request; a request leaves it only after it has left both queues. The one other place a request can be named is
  this step's rows: a request aborted between schedule() and update() is kept alive in
  `_aborted_rows` until the rows are cleared.
- This step's rows (request, tokens to compute) are C arrays; each Request remembers its row
  (-1 when not scheduled), which answers the reference's "is it already scheduled" in O(1).
- schedule() writes the batch into buffers preallocated for the largest possible step; the
  ScheduledBatch holds views of them, valid until the next schedule() and read-only by
  contract (the block-table rows are reused from step to step). update() and resolve() write
  each output's owner, token, finish code (MV_FINISH_* of ipc/minivllm_ipc.h) and sampled-row
  index into preallocated arrays as well (`out_owners`, `out_tokens`, `out_finish`,
  `out_index`): no Python object per token.
- The allocator is the Cython BlockAllocator, driven through its nogil C API.
- Overlap (defer/resolve, see the reference): a deferred step's rows are C arrays too, holding
  *owned* references to their requests until resolve(), since a request may finish or be
  aborted while its row is in flight.
"""
cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t
from libc.string cimport memcpy

import time
from types import MappingProxyType

import numpy as np
cimport numpy as cnp

from minivllm._cext.block_allocator cimport BlockAllocator
from minivllm._cext.ipc cimport MV_FINISH_ABORT, MV_FINISH_LENGTH, MV_FINISH_NONE, MV_FINISH_STOP

from minivllm.core.batch import ScheduledBatch
from minivllm.core.request import RequestStatus

cnp.import_array()

# Request states; the `status` property maps them to RequestStatus members.
cdef enum:
    WAITING = 0
    RUNNING = 1
    FINISHED = 2

_STATUS = (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.FINISHED)

# Deferred rows: flags, and the token a sampled row holds until resolve() (as the reference).
cdef enum:
    SAMPLES = 1
    LIVE = 2
cdef int64_t PLACEHOLDER = -1

# The three passes over the running queue (the reference's _schedule_running flags).
cdef enum:
    DECODES_FIRST = 0
    PREFILLS_ONLY = 1
    DECODES_ONLY = 2


# ------------------------------------------------------------------------------------------------
# Request
# ------------------------------------------------------------------------------------------------
@cython.final
cdef class Request:
    """One sequence's scheduling state. Constructor and attributes: core/request.py's Request.

    The counters are read-only from Python: the scheduler owns them, and its C loops trust them
    (num_tokens indexes the token buffer). The fields every step reads come first, so that
    they share the object's first cache lines.
    """
    cdef int64_t* tokens                   # token_ids' data
    cdef readonly int64_t num_tokens
    cdef readonly int64_t num_computed_tokens
    cdef readonly int32_t req_index
    cdef int state                         # WAITING, RUNNING or FINISHED
    cdef Py_ssize_t row                    # row in this step's batch, or -1
    cdef readonly int64_t num_prompt_tokens
    cdef readonly int64_t max_total_tokens
    cdef int64_t min_tokens
    cdef const int64_t* stop_tokens        # eos_ids | stop_ids, in C
    cdef Py_ssize_t num_stop_tokens
    cdef readonly int64_t priority
    cdef readonly int64_t arrival_seq      # tie-breaker: earlier arrivals go first

    cdef int in_flight                     # rows of a deferred step not resolved yet
    cdef readonly int64_t num_cached_tokens
    cdef readonly double arrival_time
    cdef readonly int64_t owner           # the caller's handle: outputs name it
    cdef readonly object params
    cdef readonly cnp.ndarray token_ids    # int64 [max_total_tokens]: the prompt, then outputs
    cdef readonly int finish_code          # MV_FINISH_*
    cdef cnp.ndarray _stop_array           # owns stop_tokens

    def __init__(self, int64_t owner, prompt_token_ids, params, eos_token_ids,
                 int64_t max_model_len, int64_t arrival_seq, double arrival_time,
                 int64_t priority=0):
        self.owner = owner
        self.params = params
        self.priority = priority
        self.arrival_seq = arrival_seq
        self.arrival_time = arrival_time
        self.num_prompt_tokens = len(prompt_token_ids)
        max_new = params.max_tokens or max_model_len
        self.max_total_tokens = min(max_model_len, self.num_prompt_tokens + max_new)
        self.token_ids = np.zeros(self.max_total_tokens, dtype=np.int64)
        self.token_ids[:self.num_prompt_tokens] = prompt_token_ids
        self.tokens = <int64_t*>cnp.PyArray_DATA(self.token_ids)
        self.num_tokens = self.num_prompt_tokens
        self.req_index = -1
        self.state = WAITING
        self.row = -1
        # eos and stop ids end a request alike: one C array serves the check.
        stop = {*(() if params.ignore_eos else eos_token_ids), *params.stop_token_ids}
        self._stop_array = np.array(sorted(stop), dtype=np.int64)
        self.stop_tokens = <const int64_t*>cnp.PyArray_DATA(self._stop_array)
        self.num_stop_tokens = len(self._stop_array)
        self.min_tokens = params.min_tokens

    @property
    def status(self):
        return _STATUS[self.state]

    @property
    def output_token_ids(self):
        return self.token_ids[self.num_prompt_tokens:self.num_tokens]

    @property
    def sort_key(self):
        return (self.priority, self.arrival_seq)

    def append_token(self, int64_t token):
        """Record a sampled token; return its finish code (MV_FINISH_NONE: it goes on)."""
        if self.num_tokens >= self.max_total_tokens:
            raise IndexError(f"request {self.owner} already holds {self.num_tokens} tokens")
        return self.append(token)

    cdef inline int append(self, int64_t token) noexcept:
        """append_token's C core: the caller guarantees room in the buffer."""
        self.num_tokens += 1
        return self.set_token(self.num_tokens - 1, token)

    cdef inline int set_token(self, int64_t index, int64_t token) noexcept:
        """Write the token at `index`, the last one held; its finish code."""
        self.tokens[index] = token
        if index + 1 - self.num_prompt_tokens >= self.min_tokens and self.is_stop(token):
            return MV_FINISH_STOP
        if index + 1 >= self.max_total_tokens:
            return MV_FINISH_LENGTH
        return MV_FINISH_NONE

    cdef inline bint is_stop(self, int64_t token) noexcept:
        cdef Py_ssize_t i
        for i in range(self.num_stop_tokens):  # a handful of ids: a scan beats a hash
            if self.stop_tokens[i] == token:
                return True
        return False

    cdef inline int64_t remaining(self) noexcept:
        """Tokens not computed yet: 1 for a decode, more for a prefill."""
        return self.num_tokens - self.num_computed_tokens


cdef inline bint goes_before(Request a, Request b) noexcept:
    """a.sort_key < b.sort_key: lower priority value, then earlier arrival, goes first."""
    return a.priority < b.priority or (a.priority == b.priority and a.arrival_seq < b.arrival_seq)


# ------------------------------------------------------------------------------------------------
# Queue: an order-keeping ring buffer of borrowed Request pointers. O(1) at both ends (admission
# pops the front, preemption pushes it, arrivals append); a removal inside shifts the tail, as
# the reference's list.remove does.
# ------------------------------------------------------------------------------------------------
cdef struct Queue:
    PyObject** items
    Py_ssize_t cap      # a power of two, so that an index wraps with a mask
    Py_ssize_t head     # where item 0 is
    Py_ssize_t size


cdef int q_init(Queue* q, Py_ssize_t min_cap) except -1:
    q.cap = 1
    while q.cap < min_cap:
        q.cap <<= 1
    q.items = <PyObject**>PyMem_Malloc(q.cap * sizeof(PyObject*))
    if q.items == NULL:
        raise MemoryError()
    q.head = 0
    q.size = 0
    return 0


cdef inline PyObject* q_at(const Queue* q, Py_ssize_t i) noexcept nogil:
    return q.items[(q.head + i) & (q.cap - 1)]


cdef inline void q_set(Queue* q, Py_ssize_t i, PyObject* x) noexcept nogil:
    q.items[(q.head + i) & (q.cap - 1)] = x


cdef int q_grow(Queue* q) except -1:
    """Double the capacity, unrolling the ring so that item 0 lands at index 0."""
    cdef PyObject** items = <PyObject**>PyMem_Malloc(2 * q.cap * sizeof(PyObject*))
    if items == NULL:
        raise MemoryError()
    cdef Py_ssize_t i
    for i in range(q.size):
        items[i] = q_at(q, i)
    PyMem_Free(q.items)
    q.items = items
    q.cap *= 2
    q.head = 0
    return 0


cdef int q_insert(Queue* q, Py_ssize_t i, PyObject* x) except -1:
    """Insert x before item i (i == size appends)."""
    if q.size == q.cap:
        q_grow(q)
    cdef Py_ssize_t j
    if i == 0:
        q.head = (q.head - 1) & (q.cap - 1)
    else:
        for j in range(q.size, i, -1):
            q_set(q, j, q_at(q, j - 1))
    q_set(q, i, x)
    q.size += 1
    return 0


cdef void q_remove_at(Queue* q, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t j
    if i == 0:
        q.head = (q.head + 1) & (q.cap - 1)
    else:
        for j in range(i, q.size - 1):
            q_set(q, j, q_at(q, j + 1))
    q.size -= 1


cdef void q_remove(Queue* q, PyObject* x) noexcept nogil:
    """Remove x, known to be queued."""
    cdef Py_ssize_t i = 0
    while q_at(q, i) != x:
        i += 1
    q_remove_at(q, i)


cdef list q_list(const Queue* q):
    return [<object>q_at(q, i) for i in range(q.size)]


# ------------------------------------------------------------------------------------------------
# Scheduler
# ------------------------------------------------------------------------------------------------
cdef inline int64_t* i64(cnp.ndarray a) noexcept:
    return <int64_t*>cnp.PyArray_DATA(a)


cdef cnp.ndarray as_int64_array(obj):
    """obj as an array C can read as int64 (contiguous, aligned, native order); copies only if
    it must."""
    if (cnp.PyArray_Check(obj) and cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>obj)
            and cnp.PyArray_TYPE(<cnp.ndarray>obj) == cnp.NPY_INT64):
        return <cnp.ndarray>obj
    return np.require(obj, np.int64, "CA")


@cython.final
cdef class Scheduler:
    """Continuous batching with the reference's policy (API: scheduler_ref.Scheduler)."""
    cdef readonly object config
    cdef readonly BlockAllocator allocator
    cdef readonly int32_t block_size
    cdef public object clock
    cdef dict _requests                    # owner -> Request: owns every unfinished request
    cdef readonly object requests          # a read-only view of it: the queues borrow from it
    cdef readonly int64_t num_preemptions

    # The policy knobs, read once from config.
    cdef Py_ssize_t max_num_seqs
    cdef int64_t token_budget
    cdef bint chunked_prefill, decode_first, by_priority
    cdef double batch_wait_s
    cdef int64_t max_blocks_per_seq
    cdef const int32_t* alloc_tables       # the allocator's block_tables, [max_seqs, max_blocks]
    cdef const int32_t* alloc_num_blocks   # the allocator's num_seq_blocks, [max_seqs]

    cdef Queue waiting_q, running_q
    cdef int32_t* free_indices               # a stack: req_index 0 comes out first
    cdef Py_ssize_t num_free_indices
    cdef int64_t rr                        # round-robin start of decodes under prefill-first
    cdef PyObject** order                  # scratch: one pass's visiting order

    # This step's rows: the request and how many tokens it computes.
    cdef PyObject** row_req
    cdef int64_t* row_len
    cdef Py_ssize_t num_rows
    cdef Py_ssize_t num_samples            # rows that sample a token (update() expects as many)
    cdef list _aborted_rows                # keeps requests aborted mid-step alive for update()

    # The batch buffers (numpy, so the ScheduledBatch can hold views) and their data.
    cdef cnp.ndarray _input_ids, _positions, _slot_mapping, _query_start, _seq_lens
    cdef cnp.ndarray _block_tables, _req_indices, _sample_rows
    cdef int64_t* input_ids
    cdef int64_t* positions
    cdef int64_t* slot_mapping
    cdef int64_t* query_start
    cdef int64_t* seq_lens
    cdef int32_t* block_tables
    cdef int64_t* req_indices
    cdef int64_t* sample_rows

    # What each row of the block-table buffer already holds (see _write_block_tables): the
    # first `copied` entries of one request index tenancy's table, written in one width epoch.
    # An index's tenancy number grows each time the index is released; the width epoch, each time a step's
    # table width differs from the last step's.
    cdef int64_t* index_tenancy
    cdef int64_t table_width, width_epoch
    cdef int64_t* held_index
    cdef int64_t* held_tenancy
    cdef int64_t* held_epoch
    cdef int64_t* held_copied

    # update()'s outputs, one entry per sampled row.
    cdef cnp.ndarray _out_owners, _out_tokens, _out_finish, _out_index
    cdef list _released                    # req_indices of running requests given back, until taken
    cdef Py_ssize_t num_out

    # The deferred step (defer() .. resolve()): per row its request (an owned reference), the
    # tokens it computed, the request's computed count after it, where its token
    # goes, SAMPLES | LIVE; and the req_indices released while in flight, free again at resolve().
    cdef PyObject** d_req
    cdef int64_t* d_n
    cdef int64_t* d_computed
    cdef int64_t* d_index
    cdef int8_t* d_flags
    cdef Py_ssize_t num_deferred
    cdef int32_t* held_indices
    cdef Py_ssize_t num_held

    def __init__(self, config, BlockAllocator allocator not None, clock=time.monotonic):
        if allocator.max_seqs < config.max_num_seqs:
            raise ValueError(f"the allocator has {allocator.max_seqs} req_indices, fewer than "
                             f"max_num_seqs={config.max_num_seqs}")
        self.config = config
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.clock = clock
        self._released = []
        self._requests = {}
        self.requests = MappingProxyType(self._requests)
        self._aborted_rows = []
        self.max_num_seqs = config.max_num_seqs
        self.token_budget = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.decode_first = config.policy == "decode-first"
        self.by_priority = config.priority == "priority"
        self.batch_wait_s = config.batch_wait_ms / 1000.0
        self.max_blocks_per_seq = allocator.max_blocks_per_seq
        self.alloc_tables = <const int32_t*>cnp.PyArray_DATA(allocator.block_tables)
        self.alloc_num_blocks = <const int32_t*>cnp.PyArray_DATA(allocator.num_seq_blocks)
        self._init_state()
        self._init_buffers()

    cdef int _init_state(self) except -1:
        cdef Py_ssize_t n = self.max_num_seqs, i
        q_init(&self.waiting_q, n)
        q_init(&self.running_q, n)  # never grows: at most max_num_seqs run
        # The nine int64 arrays of n entries share one allocation (row_len's).
        cdef int64_t* a = <int64_t*>PyMem_Malloc(9 * n * sizeof(int64_t))
        if a == NULL:
            raise MemoryError()
        self.row_len, self.index_tenancy, self.held_index = a, a + n, a + 2 * n
        self.held_tenancy, self.held_epoch, self.held_copied = a + 3 * n, a + 4 * n, a + 5 * n
        self.d_n, self.d_computed, self.d_index = a + 6 * n, a + 7 * n, a + 8 * n
        self.free_indices = <int32_t*>PyMem_Malloc(n * sizeof(int32_t))
        self.order = <PyObject**>PyMem_Malloc(n * sizeof(PyObject*))
        self.row_req = <PyObject**>PyMem_Malloc(n * sizeof(PyObject*))
        self.d_req = <PyObject**>PyMem_Malloc(n * sizeof(PyObject*))
        self.d_flags = <int8_t*>PyMem_Malloc(n * sizeof(int8_t))
        self.held_indices = <int32_t*>PyMem_Malloc(n * sizeof(int32_t))
        if not (self.free_indices and self.order and self.row_req and self.d_req
                and self.d_flags and self.held_indices):
            raise MemoryError()
        for i in range(n):
            self.free_indices[i] = <int32_t>(n - 1 - i)
            self.index_tenancy[i] = 0
            self.held_epoch[i] = 0  # holds nothing: the first step starts epoch 1
        self.num_free_indices = n
        return 0

    cdef int _init_buffers(self) except -1:
        """Sized for the largest step: every row a request, every budget token scheduled."""
        cdef Py_ssize_t rows = self.max_num_seqs, tokens = self.token_budget
        self._input_ids = np.zeros(tokens, np.int64)
        self._positions = np.zeros(tokens, np.int64)
        self._slot_mapping = np.zeros(tokens, np.int64)
        self._query_start = np.zeros(rows + 1, np.int64)
        self._seq_lens = np.zeros(rows, np.int64)
        # Flat, so that the [rows, max_blocks] view of a step is contiguous.
        self._block_tables = np.zeros(rows * self.max_blocks_per_seq, np.int32)
        self._req_indices = np.zeros(rows, np.int64)
        self._sample_rows = np.zeros(rows, np.int64)
        self.input_ids = i64(self._input_ids)
        self.positions = i64(self._positions)
        self.slot_mapping = i64(self._slot_mapping)
        self.query_start = i64(self._query_start)
        self.seq_lens = i64(self._seq_lens)
        self.block_tables = <int32_t*>cnp.PyArray_DATA(self._block_tables)
        self.req_indices = i64(self._req_indices)
        self.sample_rows = i64(self._sample_rows)
        self._out_owners = np.zeros(rows, np.int64)
        self._out_tokens = np.zeros(rows, np.int64)
        self._out_finish = np.zeros(rows, np.uint8)
        self._out_index = np.zeros(rows, np.int64)
        return 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.d_req != NULL:
            for i in range(self.num_deferred):
                Py_XDECREF(self.d_req[i])
        PyMem_Free(self.d_req)
        PyMem_Free(self.d_flags)
        PyMem_Free(self.held_indices)
        PyMem_Free(self.waiting_q.items)
        PyMem_Free(self.running_q.items)
        PyMem_Free(self.free_indices)
        PyMem_Free(self.order)
        PyMem_Free(self.row_req)
        PyMem_Free(self.row_len)  # and the other int64 arrays (_init_state)

    # ---- inspection ---------------------------------------------------------------------------
    @property
    def waiting(self):
        return q_list(&self.waiting_q)

    @property
    def running(self):
        return q_list(&self.running_q)

    @property
    def out_owners(self):
        """Owner of each output of the last update() or resolve()."""
        return self._out_owners[:self.num_out]

    @property
    def out_tokens(self):
        return self._out_tokens[:self.num_out]

    @property
    def out_index(self):
        """Each output's index among the step's sampled tokens (its row of the logprobs)."""
        return self._out_index[:self.num_out]

    @property
    def out_finish(self):
        """Finish code (MV_FINISH_*) of each output: FINISH_REASONS[code] is the reason."""
        return self._out_finish[:self.num_out]

    # ---- queue management ---------------------------------------------------------------------
    def add_request(self, Request req not None):
        if req.owner in self._requests:
            raise ValueError(f"owner {req.owner} is already in use")
        if req.state != WAITING or req.req_index >= 0:
            raise ValueError(f"request {req.owner} is {req.status.value}: add new ones only")
        if req.num_tokens >= req.max_total_tokens:  # the C loops write outputs without checks
            raise ValueError(f"request {req.owner}: its prompt leaves no room for output")
        self._requests[req.owner] = req
        self._enqueue(req, False)

    def abort(self, int64_t owner):
        cdef Request req = self._requests.get(owner)
        if req is None:
            return None
        if req.state == WAITING:
            q_remove(&self.waiting_q, <PyObject*>req)
        else:
            q_remove(&self.running_q, <PyObject*>req)
            self._release(req)
        if req.row >= 0:
            self._aborted_rows.append(req)
        self._finish(req, MV_FINISH_ABORT)
        return req

    def has_unfinished(self):
        return self.waiting_q.size > 0 or self.running_q.size > 0 or self.num_deferred > 0

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self):
        """Pick this step's work. Returns (batch or None, requests that just got a req_index)."""
        cdef list admitted = []
        self._clear_rows()
        if self._in_batch_window():
            return None, admitted
        cdef int64_t budget = self.token_budget
        if self.decode_first:
            budget = self._schedule_running(budget, DECODES_FIRST)
            self._admit_waiting(budget, admitted)
        else:
            budget = self._schedule_running(budget, PREFILLS_ONLY)
            budget = self._admit_waiting(budget, admitted)
            self._schedule_running(budget, DECODES_ONLY)
        # Unlike the reference, no filter of `admitted`: an admitted request is a row of this
        # step, and rows are never preempted, so every admitted request is still running.
        if self.num_rows == 0:
            return None, admitted
        return self._build_batch(), admitted

    def take_released(self):
        """The req_indices of running requests given back since the last call, in order."""
        released, self._released = self._released, []
        return np.array(released, dtype=np.int64)

    def defer(self):
        """update() for a step whose tokens are still on the device (see the reference)."""
        cdef Py_ssize_t i
        cdef int64_t n
        cdef bint samples
        cdef Request req
        for i in range(self.num_rows):
            req = <Request>self.row_req[i]
            n = self.row_len[i]
            req.row = -1
            samples = req.num_computed_tokens + n == req.num_tokens
            Py_INCREF(req)
            self.d_req[i] = <PyObject*>req
            self.d_n[i] = n
            self.d_flags[i] = SAMPLES if samples else 0
            if req.state != RUNNING:
                continue  # finished or aborted after it was scheduled: sampled all the same
            self.d_flags[i] |= LIVE
            req.num_computed_tokens += n
            self.d_computed[i] = req.num_computed_tokens
            if samples:
                self.d_index[i] = req.num_tokens
                req.tokens[req.num_tokens] = PLACEHOLDER
                req.num_tokens += 1
            req.in_flight += 1
        self.num_deferred = self.num_rows
        self.num_rows = 0
        self.num_samples = 0
        if self._aborted_rows:
            self._aborted_rows.clear()

    # ---- policy -------------------------------------------------------------------------------
    cdef int64_t _schedule_running(self, int64_t budget, int mode) except -1:
        cdef Py_ssize_t i, n = self._order_running(mode)
        cdef int64_t remaining, chunk
        cdef Request req
        for i in range(n):
            if budget == 0:
                break
            req = <Request>self.order[i]
            remaining = req.remaining()
            if req.state != RUNNING or req.row >= 0 \
                    or (mode == PREFILLS_ONLY and remaining == 1) \
                    or (mode == DECODES_ONLY and remaining > 1) \
                    or req.num_tokens == req.max_total_tokens:
                continue  # preempted earlier in this pass, already scheduled, not this pass's,
                          # or full (deferred: it ends when its last token resolves)
            chunk = self._chunk(remaining, budget)
            if chunk and self._allocate_or_preempt(req, chunk):
                self._add_row(req, chunk)
                budget -= chunk
        return budget

    cdef Py_ssize_t _order_running(self, int mode) noexcept:
        """Copy the running queue into `order` in the pass's visiting order: a snapshot, since
        preemption edits the queue during the pass (the reference iterates a copy too)."""
        cdef Queue* q = &self.running_q
        cdef Py_ssize_t i, k = 0, n = q.size, start
        if mode == DECODES_FIRST:
            # The reference's stable sort on "is a prefill": decodes, then prefills, each in
            # queue order.
            for i in range(n):
                if (<Request>q_at(q, i)).remaining() <= 1:
                    self.order[k] = q_at(q, i)
                    k += 1
            for i in range(n if k < n else 0):  # steady decode has no prefill to look for
                if (<Request>q_at(q, i)).remaining() > 1:
                    self.order[k] = q_at(q, i)
                    k += 1
        elif mode == DECODES_ONLY and n > 0:
            start = self.rr % n  # round robin: a different decode first each step
            self.rr += 1
            for i in range(n):
                self.order[i] = q_at(q, (start + i) % n)
        else:
            for i in range(n):
                self.order[i] = q_at(q, i)
        return n

    cdef int64_t _admit_waiting(self, int64_t budget, list admitted) except -1:
        cdef Request req
        cdef int64_t cached, chunk
        while self.waiting_q.size and budget > 0 and self.num_free_indices:
            req = <Request>q_at(&self.waiting_q, 0)
            if req.in_flight:
                break  # preempted while in flight: readmitted after its tokens resolve
            self.num_free_indices -= 1
            req.req_index = self.free_indices[self.num_free_indices]
            cached = self._match_prefix(req)
            chunk = self._chunk(req.num_tokens - cached, budget)
            if not chunk or not self._allocate(req.req_index, cached + chunk):
                self._release(req)  # no room now: it stays first in line
                break
            q_remove_at(&self.waiting_q, 0)
            if req.num_tokens == req.num_prompt_tokens:  # not a resumed preemption
                req.num_cached_tokens = cached
            req.num_computed_tokens = cached
            req.state = RUNNING
            q_insert(&self.running_q, self.running_q.size, <PyObject*>req)
            self._add_row(req, chunk)
            admitted.append(req)
            budget -= chunk
        return budget

    cdef inline int64_t _chunk(self, int64_t remaining, int64_t budget) noexcept:
        """Tokens to compute this step; 0 when an unchunked prefill does not fit."""
        if remaining <= budget:
            return remaining
        return budget if self.chunked_prefill else 0

    cdef int _allocate_or_preempt(self, Request req, int64_t n) except -1:
        """Find blocks for n more tokens, preempting the lowest-priority, latest request."""
        cdef Request victim
        if (req.num_computed_tokens + n
                <= <int64_t>self.alloc_num_blocks[req.req_index] * self.block_size):
            return True  # its blocks cover it already (most decodes): no allocator call
        while not self._allocate(req.req_index, req.num_computed_tokens + n):
            victim = self._pick_victim()
            self._preempt(victim)
            if victim is req:
                return False
        return True

    cdef Request _pick_victim(self):
        """The running request with the largest sort key, among those not scheduled yet (the
        first such on ties, as max() picks). The requester itself is one, so there is one."""
        cdef Request victim = None, req
        cdef Py_ssize_t i
        for i in range(self.running_q.size):
            req = <Request>q_at(&self.running_q, i)
            if req.row < 0 and (victim is None or goes_before(victim, req)):
                victim = req
        return victim

    cdef int _preempt(self, Request req) except -1:
        q_remove(&self.running_q, <PyObject*>req)
        self._release(req)
        req.num_computed_tokens = 0
        req.state = WAITING
        self.num_preemptions += 1
        self._enqueue(req, True)
        return 0

    cdef bint _in_batch_window(self) except -1:
        """An idle engine waits for more arrivals before its first prefill (dynamic batching)."""
        if not (self.batch_wait_s > 0 and self.running_q.size == 0
                and 0 < self.waiting_q.size < self.max_num_seqs):
            return False
        cdef Request first = <Request>q_at(&self.waiting_q, 0)
        return self.clock() - first.arrival_time < self.batch_wait_s

    # ---- allocator calls (its C API reports misuse by return value; here that is a bug) ---------
    cdef int64_t _match_prefix(self, Request req) except -1:
        # prompt logprobs come from the prefill's logits: such a request computes it all
        cdef int64_t wanted = 0 if req.params.prompt_logprobs is not None else req.num_tokens
        cdef int64_t cached = self.allocator.c_match_prefix(req.req_index, req.tokens, wanted)
        if cached < 0:
            raise RuntimeError(f"match_prefix refused req_index {req.req_index}")
        return cached

    cdef bint _allocate(self, int32_t req_index, int64_t num_tokens) except -1:
        cdef int rc = self.allocator.c_allocate(req_index, num_tokens)
        if rc < 0:
            raise ValueError(f"{num_tokens} tokens exceed max_blocks_per_seq="
                             f"{self.max_blocks_per_seq} blocks of {self.block_size}")
        return rc

    cdef int _commit(self, Request req, int64_t num_tokens) except -1:
        if self.allocator.c_commit(req.req_index, req.tokens, num_tokens) < 0:
            raise RuntimeError(f"commit refused req_index {req.req_index}")
        return 0

    # ---- bookkeeping --------------------------------------------------------------------------
    cdef int _enqueue(self, Request req, bint front) except -1:
        if self.by_priority:
            q_insert(&self.waiting_q, self._insort_index(req), <PyObject*>req)
        elif front:
            q_insert(&self.waiting_q, 0, <PyObject*>req)
        else:
            q_insert(&self.waiting_q, self.waiting_q.size, <PyObject*>req)
        return 0

    cdef Py_ssize_t _insort_index(self, Request req) noexcept:
        """bisect.insort's position by sort key: after the equal keys (the same bisection, so
        the same answer even on a queue that is not sorted)."""
        cdef Py_ssize_t lo = 0, hi = self.waiting_q.size, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if goes_before(req, <Request>q_at(&self.waiting_q, mid)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    cdef int _release(self, Request req) except -1:
        if req.req_index >= 0:
            if req.state == RUNNING:
                self._released.append(req.req_index)
            self.allocator.c_free(req.req_index)
            self.index_tenancy[req.req_index] += 1
            if req.in_flight:  # its deferred outputs name this req_index: free after resolve()
                self.held_indices[self.num_held] = req.req_index
                self.num_held += 1
            else:
                self.free_indices[self.num_free_indices] = req.req_index
                self.num_free_indices += 1
            req.req_index = -1
        return 0

    cdef int _finish(self, Request req, int code) except -1:
        req.state = FINISHED
        req.finish_code = code
        del self._requests[req.owner]
        return 0

    cdef inline void _add_row(self, Request req, int64_t n) noexcept:
        self.row_req[self.num_rows] = <PyObject*>req
        self.row_len[self.num_rows] = n
        req.row = self.num_rows
        self.num_rows += 1

    cdef int _clear_rows(self) except -1:
        """Forget the last step's rows (update() normally did already)."""
        cdef Py_ssize_t i
        for i in range(self.num_rows):
            (<Request>self.row_req[i]).row = -1
        self.num_rows = 0
        self.num_samples = 0
        if self._aborted_rows:
            self._aborted_rows.clear()
        return 0

    # ---- the batch ----------------------------------------------------------------------------
    cdef object _build_batch(self):
        """Write this step's rows into the batch buffers; return views of them."""
        cdef Py_ssize_t i, rows = self.num_rows
        cdef int64_t t = 0, start, n, end, max_len = 0, num_blocks
        cdef Request req
        for i in range(rows):
            req = <Request>self.row_req[i]
            n = self.row_len[i]
            start = req.num_computed_tokens
            end = start + n
            self.query_start[i] = t
            self.seq_lens[i] = end
            self.req_indices[i] = req.req_index
            self._write_tokens(req, start, n, t)
            if end == req.num_tokens:
                self.sample_rows[self.num_samples] = i
                self.num_samples += 1
            if end > max_len:
                max_len = end
            t += n
        self.query_start[rows] = t
        num_blocks = (max_len + self.block_size - 1) // self.block_size
        self._write_block_tables(num_blocks)
        return ScheduledBatch(
            input_ids=self._input_ids[:t], positions=self._positions[:t],
            slot_mapping=self._slot_mapping[:t], query_start_loc=self._query_start[:rows + 1],
            seq_lens=self._seq_lens[:rows],
            block_tables=self._block_tables[:rows * num_blocks].reshape(rows, num_blocks),
            req_indices=self._req_indices[:rows], sample_rows=self._sample_rows[:self.num_samples])

    cdef inline void _write_tokens(self, Request req, int64_t start, int64_t n,
                                   int64_t t) noexcept:
        """The request's tokens start..start+n-1, their positions and KV-cache slots, from
        token t of the batch. (A loop, not memcpy: most rows are one decode token.)"""
        cdef const int32_t* table = (self.alloc_tables
                                     + <int64_t>req.req_index * self.max_blocks_per_seq)
        cdef int64_t j, bs = self.block_size
        cdef int64_t block = start // bs, offset = start % bs  # then counted, not divided
        for j in range(n):
            self.input_ids[t + j] = req.tokens[start + j]
            if self.input_ids[t + j] == PLACEHOLDER:  # the runner takes it from the device
                self.input_ids[t + j] = -1 - req.req_index
            self.positions[t + j] = start + j
            self.slot_mapping[t + j] = <int64_t>table[block] * bs + offset
            offset += 1
            if offset == bs:
                offset = 0
                block += 1

    cdef void _write_block_tables(self, int64_t width) noexcept nogil:
        """Each row's first `width` table entries, rows packed (a [rows, width] array).

        The buffer persists across steps, and a req_index's table only grows at its end until the
        index is released. So a row that holds the same index tenancy, written at the same width,
        needs only the entries appended since -- in steady decode none or one, not the row.
        A change of width starts a new epoch: rows written at another width are stale, and
        their writes may have overrun the rows of this width's layout.
        """
        cdef Py_ssize_t i
        cdef int64_t req_index, have, now
        cdef int32_t* dst
        cdef const int32_t* src
        if width != self.table_width:
            self.table_width = width
            self.width_epoch += 1
        for i in range(self.num_rows):
            req_index = self.req_indices[i]
            dst = self.block_tables + i * width
            src = self.alloc_tables + req_index * self.max_blocks_per_seq
            now = min(<int64_t>self.alloc_num_blocks[req_index], width)
            if (self.held_epoch[i] == self.width_epoch and self.held_index[i] == req_index
                    and self.held_tenancy[i] == self.index_tenancy[req_index]):
                have = self.held_copied[i]
                if now > have:
                    memcpy(dst + have, src + have, (now - have) * sizeof(int32_t))
            else:
                memcpy(dst, src, width * sizeof(int32_t))  # zeros past the table's end too
                self.held_index[i] = req_index
                self.held_tenancy[i] = self.index_tenancy[req_index]
                self.held_epoch[i] = self.width_epoch
            self.held_copied[i] = now

    # ---- update -------------------------------------------------------------------------------
    def update(self, sampled):
        """Apply this step's sampled tokens (one per sampling row, in row order): advance every
        row, append sampled tokens, finish what stops. Returns the number of outputs, which are
        in `out_owners`, `out_tokens`, `out_finish`, `out_index`."""
        cdef cnp.ndarray arr = as_int64_array(sampled)
        if arr.ndim != 1 or arr.shape[0] < self.num_samples:
            raise ValueError(f"update() needs {self.num_samples} sampled tokens in a 1-D array, "
                             f"got shape {np.shape(sampled)}")
        cdef const int64_t* tokens = i64(arr)
        cdef Py_ssize_t i, k = 0, m = 0
        cdef int64_t n, token
        cdef bint samples
        cdef Request req
        for i in range(self.num_rows):
            req = <Request>self.row_req[i]
            n = self.row_len[i]
            req.row = -1
            samples = req.num_computed_tokens + n == req.num_tokens
            if req.state != RUNNING:
                k += samples  # aborted after it was scheduled: its row was sampled all the same
                continue
            req.num_computed_tokens += n
            if req.num_computed_tokens % self.block_size < n:
                # A block filled up (commit registers only full blocks).
                self._commit(req, req.num_computed_tokens)
            if not samples:
                continue  # a prefill chunk that does not reach the end samples nothing
            token = tokens[k]
            k += 1
            self._output(req, token, req.append(token), k - 1, m)
            m += 1
        self.num_rows = 0
        self.num_samples = 0
        self.num_out = m
        if self._aborted_rows:
            self._aborted_rows.clear()
        return m

    cdef int _output(self, Request req, int64_t token, int code, Py_ssize_t index,
                     Py_ssize_t m) except -1:
        """Output row m, for update() and resolve() alike; a request that finished leaves its
        queue and gives its req_index and blocks back."""
        i64(self._out_owners)[m] = req.owner
        i64(self._out_tokens)[m] = token
        (<uint8_t*>cnp.PyArray_DATA(self._out_finish))[m] = code
        i64(self._out_index)[m] = index
        if code != MV_FINISH_NONE:
            q_remove(&self.running_q if req.state == RUNNING else &self.waiting_q,
                     <PyObject*>req)
            self._release(req)
            if req.row >= 0:  # a row in the step being launched (deferred): keep it alive
                self._aborted_rows.append(req)
            self._finish(req, code)  # the caller's reference keeps `req` alive here
        return 0

    # ---- resolve ------------------------------------------------------------------------------
    def resolve(self, sampled):
        """The deferred step's tokens (one per sampling row, in row order), as the reference's
        resolve(). Outputs as update()'s."""
        cdef cnp.ndarray arr = as_int64_array(sampled)
        cdef Py_ssize_t i, k = 0, m = 0, needed = 0
        for i in range(self.num_deferred):
            needed += self.d_flags[i] & SAMPLES
        if arr.ndim != 1 or arr.shape[0] < needed:
            raise ValueError(f"resolve() needs {needed} sampled tokens in a 1-D array, "
                             f"got shape {np.shape(sampled)}")
        cdef const int64_t* tokens = i64(arr)
        cdef int64_t token = 0
        cdef int code
        cdef Request req
        for i in range(self.num_deferred):
            req = <Request>self.d_req[i]
            if self.d_flags[i] & SAMPLES:
                token = tokens[k]
                k += 1
            if not self.d_flags[i] & LIVE:
                continue
            req.in_flight -= 1
            if req.state == FINISHED:
                continue  # aborted while in flight
            if req.state == RUNNING and self.d_computed[i] % self.block_size < self.d_n[i]:
                self._commit(req, self.d_computed[i])  # not preempted since, and a block filled
            if not self.d_flags[i] & SAMPLES:
                continue
            code = req.set_token(self.d_index[i], token)
            self._output(req, token, code, k - 1, m)
            m += 1
        for i in range(self.num_deferred):
            Py_XDECREF(self.d_req[i])
        self.num_deferred = 0
        for i in range(self.num_held):
            self.free_indices[self.num_free_indices] = self.held_indices[i]
            self.num_free_indices += 1
        self.num_held = 0
        self.num_out = m
        return m
