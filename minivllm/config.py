"""Configuration: one validated dataclass per concern.

`ArchConfig` is what a checkpoint says about the network's shape (read from config.json, GGUF
metadata or a dummy preset). `ModelConfig`, `CacheConfig` and `SchedulerConfig` are what the
user chooses. Every dataclass validates itself on construction and raises `ValueError` naming
the field at fault.

torch is imported only where a torch object is made: frontends and the API server read these
dataclasses and must not pay for (or depend on) torch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "hf", "gguf", "dummy")
CUDA_GRAPH_MODES = ("full", "decode-only")  # which steps replay graphs (engine/cuda_graphs.py)
QUANTIZATIONS = ("auto", "gguf-native", "gguf-native-q8", "none")
# The kernel sets of layers/kernels.py, which `ModelConfig.kernels` names (or "auto").
KERNEL_SETS = ("cpu-avx512", "cpu-avx2", "cpu-portable", "cuda-triton", "torch")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def one_of(name: str, value: Any, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _non_negative(name: str, value: Any, integer: bool = False, most: float = math.inf) -> None:
    """A finite number in [0, most] (`integer`: an int); bools are refused either way."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or not 0 <= value <= most:
        bounds = ">= 0" if most == math.inf else f"in [0, {most}]"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'} "
                         f"{bounds}, got {value!r}")


@dataclass
class ArchConfig:
    """The network's shape: the subset of a Hugging Face config.json that the models read."""

    architecture: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3.1 style {"rope_type": "llama3", ...} or None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # the checkpoint's own dtype, used by dtype="auto"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            _positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ArchConfig":
        """Build from a Hugging Face config.json dictionary."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "")
        if model_type in ("llama", "mistral") or any("Llama" in a for a in archs):
            arch = "llama"
        elif model_type == "qwen2" or any("Qwen2" in a for a in archs):
            arch = "qwen2"
        else:
            raise ValueError(f"unsupported model: model_type={model_type!r} architectures={archs}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            heads = cfg["num_attention_heads"]
            hidden = cfg["hidden_size"]
            eos = cfg.get("eos_token_id")
            return cls(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or hidden // heads,
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=(cfg.get("rope_parameters") or {}).get("rope_theta")
                or cfg.get("rope_theta", 10000.0),
                rope_scaling=_rope_scaling(cfg),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                attention_bias=cfg.get("attention_bias", arch == "qwen2"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(eos) if isinstance(eos, list) else
                (() if eos is None else (eos,)),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None


def _rope_scaling(cfg: dict) -> Optional[dict]:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
    return dict(rs, rope_type="llama3")


def resolve_dtype(dtype: str, arch: ArchConfig, device: torch.device) -> torch.dtype:
    """`auto` takes the checkpoint's dtype, except float16 on CPU (slow there) becomes float32."""
    import torch

    if dtype == "auto":
        dtype = arch.torch_dtype if arch.torch_dtype in DTYPES else "float32"
        if device.type == "cpu" and dtype == "float16":
            dtype = "float32"
    one_of("dtype", dtype, DTYPES)
    return getattr(torch, dtype)


@dataclass
class ModelConfig:
    """Which weights to load, and how. `model=None` means the embedded SmolLM2-135M-Instruct."""

    model: Optional[str] = None
    load_format: str = "auto"  # auto | hf | gguf | dummy
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    max_model_len: Optional[int] = None  # default: the model's max_position_embeddings
    # auto | one of KERNEL_SETS (layers/kernels.py); None: $MINIVLLM_KERNELS, else auto. auto
    # takes the device's fastest set that runs here; torch, the reference, runs everywhere.
    kernels: Optional[str] = None
    # True: no CUDA graphs, every step runs eagerly (as vLLM's enforce_eager). Graphs need the
    # cuda-triton kernels, which read every length from device memory.
    enforce_eager: bool = False
    # Which steps replay CUDA graphs (engine/cuda_graphs.py): full (every step up to the token
    # budget) or decode-only (as vLLM's FULL_DECODE_ONLY: prefill and mixed steps eager).
    cuda_graph_mode: str = "full"
    # Default sampling for requests that leave it unset (loader/generation_config.py): auto (the
    # model directory's generation_config.json), vllm (none), or a file or directory path.
    generation_config: str = "auto"
    # GGUF weights on the CPU kernels: gguf-native keeps the linears' quantization blocks and
    # dequantizes in registers (an error where a tensor's type has no kernel), gguf-native-q8
    # also quantizes their inputs to int8 (integer dot products, as llama.cpp; AVX512-VNNI),
    # none dequantizes at load; auto takes the fastest (layers/cpu_linear.py).
    quantization: str = "auto"

    def __post_init__(self) -> None:
        one_of("quantization", self.quantization, QUANTIZATIONS)
        if self.generation_config not in ("auto", "vllm") and \
                not os.path.exists(str(self.generation_config)):
            raise ValueError(f"generation_config must be auto, vllm or an existing path; got "
                             f"{self.generation_config!r}")
        one_of("load_format", self.load_format, LOAD_FORMATS)
        if self.kernels is None:
            self.kernels = os.environ.get("MINIVLLM_KERNELS", "auto")
        if self.kernels not in ("auto", *KERNEL_SETS):
            raise ValueError(f"kernels (MINIVLLM_KERNELS) must be auto, "
                             f"{', '.join(KERNEL_SETS)}; got {self.kernels!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        one_of("cuda_graph_mode", self.cuda_graph_mode, CUDA_GRAPH_MODES)
        one_of("dtype", self.dtype, ("auto", *DTYPES))
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N]; got {self.device!r}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class CacheConfig:
    """Paged KV cache. On GPU the budget is a fraction of free memory; on CPU it is bytes."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30
    num_blocks: Optional[int] = None  # overrides both budgets (tests, benchmarks)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        _positive("cpu_kv_cache_bytes", self.cpu_kv_cache_bytes)
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)


@dataclass
class SchedulerConfig:
    """Continuous batching knobs (see DESIGN.md, "The engine step")."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "decode-first"  # decode-first | prefill-first
    batch_wait_ms: float = 0.0
    priority: str = "fcfs"  # fcfs | priority
    # Overlap: build step k+1 while the device runs step k (stop checks lag one step, and a
    # finished request computes one wasted token). None: on where steps run asynchronously
    # (CUDA); on the CPU a step is synchronous, so there is nothing to overlap.
    async_scheduling: Optional[bool] = None
    # "cython": the compiled scheduler and allocator; "python": their readable reference twins
    # (core/scheduler_ref.py, core/block_allocator_ref.py), a drop-in for the whole engine.
    implementation: str = "cython"

    def __post_init__(self) -> None:
        one_of("implementation", self.implementation, ("cython", "python"))
        one_of("async_scheduling", self.async_scheduling, (None, True, False))
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        one_of("policy", self.policy, ("decode-first", "prefill-first"))
        one_of("priority", self.priority, ("fcfs", "priority"))
        _non_negative("batch_wait_ms", self.batch_wait_ms)


@dataclass
class ParallelConfig:
    """Data parallelism: `minivllm serve` runs `data_parallel_size` engines behind the same API
    servers, each on its own GPU or its own CPU cores (minivllm/distributed/data_parallel.py);
    `data_parallel_rank` is this engine's index, set by the launcher.

    Tensor parallelism (minivllm/distributed/): `tensor_parallel_size` ranks, one process
    each, rank 0 running the engine. With `spawn_workers` rank 0 starts the others on its host
    (a free port on `master_addr` when `master_port` is 0); without, they are started by
    torchrun or by hand (`python -m minivllm.distributed.worker`) and join at
    master_addr:master_port. `remote_steps` makes every rank take its steps over ZeroMQ, the
    path of ranks on other hosts, even on rank 0's host (tests). `backend`: gloo or nccl
    (None: nccl on CUDA, else gloo)."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    spawn_workers: bool = True
    remote_steps: bool = False
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("data_parallel_size", self.data_parallel_size)
        if not (isinstance(self.data_parallel_rank, int)
                and 0 <= self.data_parallel_rank < self.data_parallel_size):
            raise ValueError(f"data_parallel_rank must be in [0, {self.data_parallel_size}), "
                             f"got {self.data_parallel_rank!r}")
        _non_negative("master_port", self.master_port, integer=True, most=65535)
        if not self.spawn_workers and self.master_port == 0:
            raise ValueError("master_port 0 (a free port) works only when rank 0 spawns its "
                             "workers: ranks started elsewhere need a fixed master_port")
        one_of("backend", self.backend, ("gloo", "nccl", None))


@dataclass
class EngineConfig:
    """Everything the engine needs, in one place."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class ZmqEndpointConfig:
    """The ZeroMQ endpoint for other-language clients (ipc/PROTOCOL.md, "ZeroMQ endpoint"): a
    door open to whoever reaches its address, so everything a peer can claim is bounded.

    `max_message_bytes` is the engine's ZMQ_MAXMSGSIZE: a peer that sends a larger frame is
    disconnected before the frame is stored (None: room for a prompt of the model's whole
    context and as many stop ids). `max_in_flight_per_peer` and `max_in_flight` bound the
    unfinished requests of one connection and of all of them; past either a submit gets
    MV_ERR_OVERLOADED, as HTTP answers 429. `send_queue` records may wait for a peer that does
    not read (ZMQ_SNDHWM); past that the peer counts as gone and its requests are aborted.
    A peer refused `max_refusals` times in a row for its own limit (none of its submits
    admitted between) ignores the refusals: it is cut off, its requests are aborted, and what
    it sends later is refused until it reconnects.
    With `curve_secret_key` (a ZeroMQ certificate file with the server's key pair) and
    `curve_clients` (a directory of the allowed clients' public certificates) the endpoint
    takes only CURVE-encrypted connections from those clients.
    """

    max_message_bytes: Optional[int] = None
    max_in_flight_per_peer: int = 16
    max_in_flight: int = 64
    send_queue: int = 10000
    max_refusals: int = 1024
    curve_secret_key: Optional[str] = None
    curve_clients: Optional[str] = None

    def __post_init__(self) -> None:
        if self.max_message_bytes is not None:
            from minivllm._cext.records import MAX_RECORD_BYTES

            _positive("max_message_bytes", self.max_message_bytes)
            if not 4096 <= self.max_message_bytes <= MAX_RECORD_BYTES:
                raise ValueError(f"max_message_bytes must be in [4096, {MAX_RECORD_BYTES}] "
                                 f"(the protocol's record limit), got {self.max_message_bytes}")
        for name in ("max_in_flight_per_peer", "max_in_flight", "send_queue", "max_refusals"):
            _positive(name, getattr(self, name))
        if (self.curve_secret_key is None) != (self.curve_clients is None):
            raise ValueError("curve_secret_key and curve_clients go together: the server's "
                             "key pair and the directory of allowed client keys")
        if self.curve_secret_key is not None and not os.path.isfile(self.curve_secret_key):
            raise ValueError(f"curve_secret_key: no file {self.curve_secret_key!r}")
        if self.curve_clients is not None and not os.path.isdir(self.curve_clients):
            raise ValueError(f"curve_clients: no directory {self.curve_clients!r}")

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None


@dataclass
class TransportConfig:
    """How frontends reach the engine process (see ipc/PROTOCOL.md).

    `control` is the engine's control socket (a fresh ipc:// path when None); `zmq_endpoint` the
    ROUTER socket for other-language clients (None: off). A consumer with empty rings busy-polls
    for `spin_us` before it sleeps on its doorbell: a steady stream never pays a wake-up, and a
    pause costs at most this much CPU (on 2 cores a frontend spinning for long steals the
    engine's). A producer facing a full ring waits `ring_timeout_s` before it gives up.
    """

    control: Optional[str] = None
    zmq_endpoint: Optional[str] = None
    ring_capacity: int = 1 << 22
    spin_us: float = 50.0
    ring_timeout_s: float = 10.0
    frontend_check_s: float = 0.5  # how often the engine checks that its frontends still live
    zmq: ZmqEndpointConfig = field(default_factory=ZmqEndpointConfig)

    def __post_init__(self) -> None:
        cap = self.ring_capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 4096 or cap & (cap - 1):
            raise ValueError(f"ring_capacity must be a power of two >= 4096, got {cap!r}")
        for name in ("spin_us", "ring_timeout_s", "frontend_check_s"):
            _non_negative(name, getattr(self, name))


@dataclass
class SupervisorConfig:
    """How `minivllm serve` keeps the engine process up.

    The engine gets `start_timeout_s` to load its model and answer. When it dies it is
    restarted after `backoff_s`, doubling per consecutive failure up to `backoff_max_s`; more
    than `restart_limit` restarts within `restart_window_s` and the supervisor gives up.
    """

    start_timeout_s: float = 600.0
    restart_limit: int = 5
    restart_window_s: float = 300.0
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("start_timeout_s", "restart_window_s", "backoff_s", "backoff_max_s"):
            _non_negative(name, getattr(self, name))
        _non_negative("restart_limit", self.restart_limit, integer=True)


@dataclass
class ServerConfig:
    """The OpenAI-compatible HTTP server (`minivllm serve`).

    `max_pending` bounds the requests in flight (accepted, not finished) per API-server process;
    past it a request gets 429 with Retry-After. On SIGTERM/SIGINT new requests get 503 and
    in-flight ones get `drain_timeout_s` to finish. With `api_key` set, /v1, the tokenizer
    endpoints and the dashboard's events need `Authorization: Bearer <key>`. `dashboard`
    serves the live dashboard at /dashboard.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_servers: int = 1
    max_pending: int = 1024
    drain_timeout_s: float = 30.0
    api_key: Optional[str] = None
    served_model_name: Optional[str] = None
    max_body_bytes: int = 8 << 20
    retry_after_s: int = 1
    dashboard: bool = True
    # A jinja chat template file used instead of the model's (--chat-template), and the parser
    # that takes tool calls out of "auto" tool-choice outputs (--tool-call-parser).
    chat_template: Optional[str] = None
    tool_call_parser: Optional[str] = None
    # A streamed response sends at most one chunk per `stream_interval_s`: the tokens of the
    # engine steps in between go out together, in one write (less CPU per token in the API
    # servers and in the clients, for a coarser stream). 0: a chunk per engine step.
    stream_interval_s: float = 0.0

    def __post_init__(self) -> None:
        one_of("tool_call_parser", self.tool_call_parser, ("hermes", None))
        if self.chat_template is not None:
            from minivllm.tokenizer import compile_chat_template
            try:
                with open(self.chat_template, encoding="utf-8") as f:
                    compile_chat_template(f.read())
            except (OSError, ValueError) as exc:
                raise ValueError(f"chat_template {self.chat_template}: {exc}") from None
        _non_negative("port", self.port, integer=True, most=65535)
        for name in ("max_body_bytes", "retry_after_s"):
            _non_negative(name, getattr(self, name), integer=True)
        _positive("api_servers", self.api_servers)
        _positive("max_pending", self.max_pending)
        for name in ("drain_timeout_s", "stream_interval_s"):
            _non_negative(name, getattr(self, name))
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")


EXIT_S = 5.0  # what a process needs, past its last step, to close its sockets and segments


def shutdown_timeouts(drain_timeout_s: float, step_p99_s: float) -> tuple[float, float]:
    """The one rule for how long a shutdown waits, from --drain-timeout and the engine's p99
    step time: (drain, grace).

    drain = max(drain_timeout_s, 3 x p99 step): in-flight requests get this long to finish,
    never less than three slow steps; those still running then end with an error.
    grace = 3 x p99 step + EXIT_S: then each process (API server, engine) gets this long to
    finish the step under way, deliver those errors and exit; past it, it is killed."""
    slow = 3.0 * step_p99_s
    return max(drain_timeout_s, slow), slow + EXIT_S
