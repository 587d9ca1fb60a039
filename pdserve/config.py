"""Dataclasses that describe a model architecture, its KV cache and the scheduler's limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.security import SECRET_ENV, DeploymentSecret, SecretError


@dataclass
class VisionConfig:
    """A SmolVLM / Idefics3 vision tower (SigLIP encoder) and its pixel-shuffle connector."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # a tile's side in pixels (the learned position grid covers this)
    patch_size: int
    scale_factor: int  # pixel shuffle: scale_factor**2 patches fold into one text token
    image_token_id: int  # the prompt's placeholder id that image embeddings replace
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Text positions one full-size tile fills."""
        return (self.patches_per_side // self.scale_factor) ** 2


@dataclass
class ModelConfig:
    """A Llama-family architecture (Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3), or SmolVLM: a
    Llama text model with a vision tower (`vision`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face style dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2/2.5: bias on the q, k, v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # "llama", "qwen2", "qwen3" or "smolvlm": which HF class is the reference
    architecture: str = "llama"
    vision: VisionConfig | None = None  # set for vision-language models only

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):  # read back from JSON (the GGUF config cache)
            self.vision = VisionConfig(**self.vision)


@dataclass
class CacheConfig:
    """The paged KV cache: block size and how much memory it may take."""

    block_size: int = 16
    num_blocks: int | None = None  # set directly, or derived from the memory budget below
    kv_cache_memory: int | None = None  # bytes (CPU); None = a default budget
    gpu_memory_utilization: float = 0.90  # fraction of GPU memory for weights + activations + KV
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_batched_tokens: int = 2048  # token budget of one step (decode tokens + prefill chunks)
    max_num_seqs: int = 128  # sequences running at once
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    enable_chunked_prefill: bool = True
    # ITL target: with decodes running, a step's prefill chunk is the largest whose predicted
    # step time stays under this (always at least one block). None or 0 = the token budget
    # alone. Off by default: the right figure is an SLO choice that depends on model and
    # device, and the engine times a few steps at start to predict (see engine/step_time.py)
    max_step_ms: float | None = None
    step_time_file: str | None = None  # a StepTimeModel as JSON, instead of timing at start
    # a decoding request at most this many tokens short of its max_tokens finishes before a
    # long prompt is admitted (Scheduler._holds_admission), for at most this many steps in a
    # row. 0 (the default) = admit at once: in a closed loop of clients it lines their
    # requests up, and TTFT pays for the TPOT it saves (docs/PERF.md, session 21)
    finish_first_tokens: int = 0


@dataclass
class EngineArgs:
    """Everything needed to build one engine instance (what `pdserve serve` flags fill in)."""

    model: str | None = None  # None = the embedded SmolLM2; a preset name; or a HF folder
    tokenizer: str | None = None  # --tokenizer; None = the model's (grammars need its vocab)
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # "auto" = cuda if available else cpu
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    role: str = "colocated"  # "colocated", "prefill" or "decode"
    tensor_parallel_size: int = 1
    kv_transport: str | None = None  # force "cuda_ipc", "host" or "tcp"; None = fastest that works
    # where P's KV source listens, and the address D dials (another host needs a reachable one)
    kv_host: str = "127.0.0.1"
    kv_advertise_host: str | None = None  # None = kv_host
    kv_lease_ttl_s: float = 30.0  # P keeps a prefill's KV this long unless D releases it sooner
    enforce_eager: bool = False  # no CUDA graphs
    # queue step k+1 before reading step k's tokens back (colocated, one device). None: on
    # for a colocated engine on one GPU, off elsewhere (a CPU step has nothing to overlap)
    async_scheduling: bool | None = None
    # CPU engines: torch threads. None = $PDSERVE_CPU_THREADS, else half the cores, because
    # several instances usually share one machine and oversubscribed OpenMP threads spin.
    cpu_threads: int | None = None
    # the secret of the deployment this instance belongs to (see docs/DESIGN.md, Trust
    # model): signs and checks KV hand-offs and authenticates the KV socket
    deployment_secret: DeploymentSecret | None = field(default=None, repr=False)
    # prefill role: hold KV for callers without the secret (behind vLLM's P/D proxies)
    accept_client_kv_requests: bool = False

    def require_deployment_secret(self) -> None:
        """Prefill and decode instances exchange KV only with holders of the secret: refuse
        to start without it (before minutes of model loading)."""
        if self.role in ("prefill", "decode") and self.deployment_secret is None:
            raise SecretError(
                f"a {self.role} instance needs the deployment secret: set ${SECRET_ENV} or "
                "pass --secret-file (`pdserve up` generates one)")
