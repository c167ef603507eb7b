"""`HybridParallelStrategy`: embedding tables model-parallel with TorchRec, the rest under DDP."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import (
    GradientAccumulationScheduler,
    ModelPruning,
    ModelSummary,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardedModule, ShardingEnv, ShardingPlan
from torchrec.optim.optimizers import in_backward_optimizer_filter
from typing_extensions import override

from lightning_dembed._private import (
    DenseDDPForwardRedirection,
    flush_first_static_graph_iteration,
    init_optimizers_and_lr_schedulers,
    prepare_for_backward,
    pruned_modules,
    register_ddp_comm_hook,
    skip_sigterm_broadcast,
)
from lightning_dembed.checkpoint import (
    CheckpointError,
    local_tensors,
    copy_full_into_sharded,
    load_sharded_tensors,
    read_sharded_checkpoint,
    refuse_mismatched_keys,
    remove_sharded_checkpoint,
    reshaped_tensors,
    saved_keys,
    saved_only_entries,
    save_sharded_checkpoint,
    set_extra_states,
    unsaved_tensors,
)
from lightning_dembed.sharding.hooks import FeatureCheck, divide_only_row_wise_bags, register_output_order
from lightning_dembed.sharding.lookup import LookupPipeline, ShardedLookup
from lightning_dembed.sharding.notices import torchrec_notices_silenced
from lightning_dembed.sharding.optimizer import (
    EmbeddingOptimizer,
    ParamGroupRef,
    TableHyperParameters,
    apply_embedding_optimizers,
    refuse_hand_picked_parameters_without_tables,
    split_saved_optimizer_state,
    table_param_groups,
)
from lightning_dembed.modules.discovery import (
    find_embedding_modules,
    find_plain_embedding_layers,
    input_rewritten_by_wrapper,
)
from lightning_dembed.sharding.planner import default_memory_budget, plan_sharding
from lightning_dembed.sharding.policy import ShardingPolicy
from lightning_dembed.sharding.sharders import default_sharders
from lightning_dembed.sharding.types import Offload, Placement, PlanSummary
from lightning_dembed.strategies.launcher import FirstFailureScriptLauncher, ShardedMultiProcessingLauncher
from lightning_dembed.strategies.pipeline import PipelinedLoader

__all__ = ["HybridParallelStrategy", "parse_bytes"]

log = logging.getLogger(__name__)


def parse_bytes(value: Union[int, str, None]) -> Optional[int]:
    """Bytes from an int or a string such as ``"80GiB"``."""
    if value is None or isinstance(value, int):
        return value
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "b": 1}
    text = value.strip().lower()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"memory_budget_per_rank must be bytes (int) or a string like '4GiB', got {value!r}")


class _DenseDataParallelWrapper(DefaultDataParallelWrapper):
    """TorchRec's DDP wrapping of the dense part, with DDP's buffer broadcast on, as under strategy="ddp".

    TorchRec turns ``broadcast_buffers`` off. A BatchNorm in the dense part would then keep each
    rank's own running statistics, and evaluation and checkpoints would see another rank's than
    rank 0's. The sharded modules' buffers (the tables' kernels and their optimizer state) differ
    per rank by design and stay out of the broadcast.
    """

    def _ddp_wrap(
        self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device, ddp_ignore_param_names: set[str]
    ) -> None:
        wrapped = dmp._dmp_wrapped_module
        if not set(dict(wrapped.named_parameters())) - ddp_ignore_param_names:
            return  # nothing dense to train, as TorchRec's own wrapper decides
        sharded_buffers = {
            f"{path}.{name}"
            for path, module in wrapped.named_modules()
            if isinstance(module, ShardedModule)
            for name, _ in module.named_buffers()
        }
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module=wrapped, params_and_buffers_to_ignore=ddp_ignore_param_names | sharded_buffers
        )
        dmp._dmp_wrapped_module = DistributedDataParallel(
            module=wrapped.to(device),
            device_ids=None if device.type == "cpu" else [device],
            process_group=env.process_group,
            gradient_as_bucket_view=True,
            broadcast_buffers=True,
            static_graph=self._static_graph,
            find_unused_parameters=self._find_unused_parameters,
            bucket_cap_mb=self._bucket_cap_mb,
            **self._ddp_kwargs,
        )


def _data_parallel_wrapper(ddp_kwargs: Mapping[str, Any]) -> DefaultDataParallelWrapper:
    kwargs = dict(ddp_kwargs)
    fixed = sorted({"device_ids", "process_group", "gradient_as_bucket_view", "broadcast_buffers"} & kwargs.keys())
    if fixed:
        raise ValueError(f"HybridParallelStrategy sets DDP's {fixed} itself; remove them")
    return _DenseDataParallelWrapper(
        # TorchRec's default, unlike Lightning's: the dense graph of a recommender does not change;
        # but one that asks DDP to find unused parameters says it does.
        static_graph=kwargs.pop("static_graph", not kwargs.get("find_unused_parameters", False)),
        find_unused_parameters=kwargs.pop("find_unused_parameters", False),
        bucket_cap_mb=kwargs.pop("bucket_cap_mb", 25),
        ddp_kwargs=kwargs,
    )


def _find_ddp(dmp: DistributedModelParallel) -> Optional[DistributedDataParallel]:
    return next((m for m in dmp.modules() if isinstance(m, DistributedDataParallel)), None)


WEIGHT_AVERAGING_CALLBACKS = (StochasticWeightAveraging, WeightAveraging)
# A frozen table trains with the smallest positive learning rate, which FBGEMM's kernels (float32)
# read as 0: never a group's own rate, so TorchRec never puts it in one kernel with a trainable
# table whose group starts at 0 (a warm-up from 0), whose rate every step then sets.
FROZEN_TABLE = EmbeddingOptimizer(torch.optim.SGD, {"lr": math.ulp(0.0)})
CLIP_DENSE_ONLY = (
    "Clip the dense parameters only, with code that trains the same under strategy='ddp': in configure_gradient_clipping (or a "
    "manual training_step) call torch.nn.utils.clip_grad_norm_(lightning_dembed.dense_parameters(self), max_norm) "
    "or clip_grad_value_ (or self.clip_gradients on an optimizer given dense_parameters(self)); the tables then "
    "train unclipped"
)


def _table_name(parameter_name: str) -> str:
    """The table of an embedding module's parameter (``<module path>.embedding_bags.<table>.weight``)."""
    return parameter_name.rpartition(".")[0].rpartition(".")[2]


def _warn_of_plain_embedding_layers(module: nn.Module) -> None:
    """Name the embedding layers this strategy leaves replicated: they are not what a user expects sharded."""
    layers = find_plain_embedding_layers(module)
    if not layers:
        return
    described = ", ".join(
        f"{path} ({type(m).__name__} {m.num_embeddings}x{m.embedding_dim}, "
        f"{m.weight.numel() * m.weight.element_size() / 2**20:.1f} MiB)"
        for path, m in layers.items()
    )
    rank_zero_warn(
        f"HybridParallelStrategy shards TorchRec embedding collections only; {described} stay whole on every "
        "rank and train under DDP as dense parameters (correct, but not sharded). Wrap them in "
        "lightning_dembed.DistributedEmbedding to shard them, or leave small ones as they are"
    )


class _BatchCountCheck:
    """One step's comparison of "this is my last batch" across ranks, started without waiting."""

    def __init__(self, ends: bool, rank: int, epoch: int, batch_idx: int, group: Any) -> None:
        self.ends, self.rank, self.epoch, self.batch_idx = ends, rank, epoch, batch_idx
        self.seen = torch.tensor([int(ends), int(not ends)], dtype=torch.int32)
        self.work = torch.distributed.all_reduce(
            self.seen, op=torch.distributed.ReduceOp.MAX, group=group, async_op=True
        )

    def verify(self) -> None:
        self.work.wait()
        if bool(self.seen.all()):
            raise RuntimeError(
                f"rank {self.rank}: the ranks' train dataloaders yield different numbers of batches in epoch "
                f"{self.epoch} (this rank's {'ends' if self.ends else 'goes on'} after batch {self.batch_idx}). "
                "Sharded lookups and DDP need every rank in every step: make each rank yield the same number of "
                "batches (a DistributedSampler with drop_last=True, an IterableDataset that drops the remainder "
                "when it splits over ranks, or limit_train_batches)"
            )


class _SignalsAtStepStart:
    """Lightning's SIGTERM and SLURM-requeue handlers, run by every rank at the start of one same training step.

    Lightning runs them from the signal handler, wherever each rank is. There its SIGTERM handler
    broadcasts on the default group and the requeue handler saves a checkpoint (a collective
    here); either pairs with whatever collective the other ranks are in, and gloo aborts on the
    mismatch. Here a signal only marks. At agreed training steps the ranks start an all-reduce of
    their marks on the control group without waiting; the next agreed step reads it, and where any
    rank was marked every rank runs Lightning's handler then, before the forward. After the SIGTERM
    handler every rank leaves fit at the end of that same step, as Lightning does on the rank that
    got the signal (its ``SIGTERMException``, whose ``on_exception`` callbacks may save a
    checkpoint). So the blocking broadcast of rank 0's SIGTERM flag that Lightning's fit loop makes
    before every step has nothing left to tell, and is skipped while this is installed.

    The steps are agreed about ``seconds_between_agreements`` apart (never more than
    ``most_steps_between_agreements``): an all-reduce every step cost 5% of a small step's time on
    two CPU processes. The all-reduce carries the ranks' slowest time per step too, so every rank
    derives the same next agreed step from the same numbers. A signal takes effect within about
    twice that time, well within SLURM's requeue warning and the usual 30 s before a SIGKILL.
    """

    seconds_between_agreements = 1.0
    most_steps_between_agreements = 100

    def __init__(self, handlers: dict[int, Callable[..., Any]], group: Any, trainer: "pl.Trainer") -> None:
        self.handlers, self.group = handlers, group
        self.marked = dict.fromkeys(handlers, False)
        self.handled = dict.fromkeys(handlers, False)  # each once per run: one checkpoint, one stop
        self._steps_to_agreement = 0
        self._steps_since_agreement = 0
        self._agreed_at: Optional[float] = None  # when the last agreed step started
        self._shared: Optional[torch.Tensor] = None  # the marks, then the slowest rank's seconds per step
        self._work: Any = None
        for signum in handlers:
            signal.signal(signum, self._mark)
        self._restore_sigterm_broadcast = skip_sigterm_broadcast(trainer)

    @classmethod
    def install(
        cls, trainer: "pl.Trainer", environment: Optional[ClusterEnvironment], group: Any
    ) -> Optional[_SignalsAtStepStart]:
        """Take over the handlers Lightning has installed: SIGTERM's, and on SLURM with ``auto_requeue`` the requeue signal's."""
        on_main_thread = threading.current_thread() is threading.main_thread()  # where signals are handled
        if trainer.world_size < 2 or not on_main_thread:
            return None
        signums = [signal.SIGTERM]
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
            signums.insert(0, environment.requeue_signal)  # the checkpoint before the stop
        handlers = {signum: signal.getsignal(signum) for signum in signums}
        handlers = {signum: handler for signum, handler in handlers.items() if callable(handler)}
        return cls(handlers, group, trainer) if handlers else None

    def _mark(self, signum: int, frame: Any) -> None:
        self.marked[signum] = True

    def at_step_start(self) -> None:
        self._steps_since_agreement += 1
        if self._steps_to_agreement > 0:
            self._steps_to_agreement -= 1
            return
        if self._work is not None:
            self._run_marked_handlers()
            seconds_per_step = float(self._shared[-1])
            steps = int(self.seconds_between_agreements / max(seconds_per_step, 1e-9))  # 0 after inf
            self._steps_to_agreement = min(max(steps, 1), self.most_steps_between_agreements) - 1
        now = time.perf_counter()
        # Before a whole step is timed: unknown, so the next step is agreed too.
        seconds_per_step = math.inf if self._agreed_at is None else (now - self._agreed_at) / self._steps_since_agreement
        self._agreed_at, self._steps_since_agreement = now, 0
        self._start_all_reduce(seconds_per_step)

    def _start_all_reduce(self, seconds_per_step: float) -> None:
        marks = [float(self.marked[signum] and not self.handled[signum]) for signum in self.handlers]
        self._shared = torch.tensor([*marks, seconds_per_step], dtype=torch.float64)
        self._work = torch.distributed.all_reduce(
            self._shared, op=torch.distributed.ReduceOp.MAX, group=self.group, async_op=True
        )

    def _run_marked_handlers(self) -> None:
        self._work.wait()
        self._work = None
        for signum, any_rank_marked in zip(self.handlers, self._shared.tolist()):
            if any_rank_marked and not self.handled[signum]:  # the same on every rank: the ranks' maximum
                self.handled[signum] = True
                self.handlers[signum](signum, None)

    def close(self) -> None:
        """At the end of fit (every rank): act on the marks not yet shared, then give everything back to Lightning."""
        if self._work is not None:
            self._run_marked_handlers()
        self._start_all_reduce(0.0)
        self._run_marked_handlers()
        self.release()

    def release(self) -> None:
        """Give the signals and the per-step broadcast back to Lightning (after a failed run: nothing waited for)."""
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        self._restore_sigterm_broadcast()


class HybridParallelStrategy(DDPStrategy):
    """Shard every TorchRec embedding module of a LightningModule; keep the dense rest under DDP.

    On setup the strategy finds each `EmbeddingBagCollection` and `EmbeddingCollection` (built on
    the meta device or not), plans their sharding (TorchRec's planner, or Merlin Distributed
    Embeddings' thresholds and placement when those knobs are set), shards them with TorchRec's
    `DistributedModelParallel`, and wraps the remaining parameters in DDP. Tables train with the
    fused FBGEMM twin of the optimizer ``configure_optimizers`` returns. Checkpoints are sharded
    directories written with torch.distributed.checkpoint and load into any number of processes.

    Args:
        placement: Merlin placement of table-parallel slices: ``"basic"``, ``"memory_balanced"`` or
            ``"memory_optimized"``. Setting it (or a threshold) uses Merlin's rules instead of the planner.
        column_slice_threshold: largest table-parallel slice, in elements (``rows * dim``).
        row_slice_threshold: tables of at least this many elements are sharded row-wise.
        data_parallel_threshold: tables of at most this many elements are replicated.
        sharding_types: a sharding type per table name (``table_wise``, ``row_wise``, ``column_wise``,
            ``table_row_wise``, ``table_column_wise``, ``data_parallel``).
        constraints: TorchRec ``ParameterConstraints`` per table name, for the planner.
        embedding_optimizer: the tables' optimizer; by default derived from ``configure_optimizers``.
        memory_budget_per_rank: bytes (or ``"8GiB"``) a rank may hold in tables and optimizer state;
            defaults to the GPU's memory, or the host's RAM divided by its local processes.
        offload: on GPUs, the largest tables that do not fit ``memory_budget_per_rank`` go to host
            memory with TorchRec's UVM kernels (Merlin's ``gpu_embedding_size``): ``"uvm_caching"``
            (a GPU cache of hot rows) or ``"uvm"``. By default a plan that does not fit is refused.
        skip_nonfinite_loss: skip, on every rank, the backward and update of a step whose loss is
            NaN or infinite on any rank, before FBGEMM writes a non-finite update into the tables.
            The step still counts. Costs one scalar all-reduce and a host sync per backward.
        hand_back_weights: under the spawn/fork start methods, gather the full tables on rank 0 and
            hand them back to the launching process after ``fit``, as DDP does. Set False for
            models larger than one host: that process's module is then moved to the meta device.
        pipeline: start the next batch's input all-to-alls while the current batch trains (as
            TorchRec's ``TrainPipelineSparseDist``); losses and weights are those of unpipelined
            training. Applies to train dataloaders with a length, and to embedding modules called
            with the batch's ``KeyedJaggedTensor`` as the dataloader yields it; the rest runs
            unpipelined. Set False to turn it off.
        check_ids: check every id against its table before the lookup, naming the feature and
            table at fault (one host sync per step). Off, FBGEMM's kernels check them without a
            sync; on CPU their failure is re-checked into the same message, on GPU it is a device
            assertion, so turn this on to debug one there.
        **kwargs: passed to `DDPStrategy` (``start_method``, ``process_group_backend``, ``timeout``...);
            DDP's own arguments (``find_unused_parameters``, ``static_graph``, ``bucket_cap_mb``...)
            configure the DDP that TorchRec wraps around the dense parameters.

    Example::

        trainer = Trainer(strategy="hybrid_parallel", accelerator="cpu", devices=2)
        trainer = Trainer(strategy=HybridParallelStrategy(sharding_types={"t_user": "row_wise"}), devices=8)
    """

    strategy_name = "hybrid_parallel"

    def __init__(
        self,
        placement: Optional[Placement] = None,
        column_slice_threshold: Optional[int] = None,
        row_slice_threshold: Optional[int] = None,
        data_parallel_threshold: Optional[int] = None,
        sharding_types: Optional[Mapping[str, str]] = None,
        constraints: Optional[Mapping[str, ParameterConstraints]] = None,
        embedding_optimizer: Optional[EmbeddingOptimizer] = None,
        memory_budget_per_rank: Union[int, str, None] = None,
        offload: Optional[Offload] = None,
        skip_nonfinite_loss: bool = False,
        hand_back_weights: bool = True,
        pipeline: bool = True,
        check_ids: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._data_parallel_wrapper = _data_parallel_wrapper(self._ddp_kwargs)
        self._forward_redirection = DenseDDPForwardRedirection(self._dense_ddp)
        self._static_graph_flushed = False
        self.policy = ShardingPolicy(
            placement=placement,
            column_slice_threshold=column_slice_threshold,
            row_slice_threshold=row_slice_threshold,
            data_parallel_threshold=data_parallel_threshold,
            sharding_types=dict(sharding_types or {}),
            constraints=dict(constraints or {}),
            offload=offload,
        )
        if embedding_optimizer is not None and not isinstance(embedding_optimizer, EmbeddingOptimizer):
            raise TypeError(
                f"embedding_optimizer must be an EmbeddingOptimizer, got {type(embedding_optimizer).__name__}"
            )
        self._explicit_embedding_optimizer = embedding_optimizer
        self._embedding_optimizer: Optional[EmbeddingOptimizer] = embedding_optimizer
        self._memory_budget = parse_bytes(memory_budget_per_rank)
        self._skip_nonfinite_loss = skip_nonfinite_loss
        self._hand_back_weights = hand_back_weights
        self._pipeline_enabled = pipeline
        self._check_ids = check_ids
        self._pipeline: Optional[LookupPipeline] = None
        self._sharders: list[ModuleSharder[nn.Module]] = default_sharders(offload=offload)
        self._table_groups: dict[str, ParamGroupRef] = {}
        self._table_optimizers: dict[str, EmbeddingOptimizer] = {}
        self._table_hyper_parameters: Optional[TableHyperParameters] = None
        self._configured_param_names: list[list[list[str]]] = []  # per optimizer and group, tables included
        self._trained_tables_by_optimizer: dict[int, list[str]] = {}  # id(optimizer): its trainable tables
        self._fused_tables: dict[str, nn.Parameter] = {}  # the tables FBGEMM updates, by parameter name
        self._backward_since_step = False  # FBGEMM updated the tables in a backward whose step has not run yet
        self._embedding_paths: list[str] = []
        self._control_group: Optional[torch.distributed.ProcessGroup] = None
        self._batch_check: Optional[_BatchCountCheck] = None
        self._signals: Optional[_SignalsAtStepStart] = None
        self._lengths_agree_in_epoch: Optional[tuple[int, bool]] = None  # (epoch, whether they agree)
        self._dmp: Optional[DistributedModelParallel] = None
        self._ddp: Optional[DistributedDataParallel] = None
        self.sharding_plan: Optional[ShardingPlan] = None
        self.plan_summary: Optional[PlanSummary] = None

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (
            ("hybrid_parallel", "popen"),
            ("hybrid_parallel_spawn", "spawn"),
            ("hybrid_parallel_fork", "fork"),
        ):
            if name in strategy_registry:
                continue  # spawned processes import the package again
            strategy_registry.register(
                name,
                cls,
                description=f"TorchRec-sharded embeddings + DDP, start_method '{start_method}'",
                start_method=start_method,
            )

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            # Lightning's script launcher, ending on the error of the rank that failed first.
            self._launcher = FirstFailureScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = ShardedMultiProcessingLauncher(
                self, start_method=self._start_method, hand_back_weights=self._hand_back_weights
            )

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Shards exist only after sharding: load into them, not into the unsharded module.
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return True

    @property
    def embedding_optimizer(self) -> Optional[EmbeddingOptimizer]:
        """The tables' fused optimizer (known once setup has run)."""
        return self._embedding_optimizer

    @property
    def fused_optimizer(self) -> Any:
        """TorchRec's combined in-backward optimizer over every sharded table (after setup)."""
        return self._dmp.fused_optimizer if self._dmp is not None else None

    # -- setup -----------------------------------------------------------------------------------

    # DDPStrategy.setup runs the stages in Lightning's order (layer sync, precision, model_to_device,
    # configure_ddp, setup_optimizers; or the dense state broadcast when not fitting). The strategy
    # refuses what it cannot do the way DDP does, then extends those hooks:
    #   model_to_device  -> shard the tables (TorchRec DMP), dense part to the device
    #   configure_ddp    -> DDP around the dense parameters, DDP comm hooks on that DDP
    #   setup_optimizers -> tables out of the dense optimizers; their fused kernels follow the groups

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        self._backward_since_step = False  # a fit that failed mid-step left it set
        fitting = trainer.state.fn == TrainerFn.FITTING
        self._refuse_unsupported(trainer, fitting)
        self._sharders = default_sharders(offload=self.policy.offload)
        if self._control_group is None:
            # Small host-side agreements between ranks, off the queue of the model's collectives
            # (see _check_every_rank_has_this_batch).
            self._control_group = torch.distributed.new_group(backend="gloo")
        self._batch_check, self._lengths_agree_in_epoch = None, None
        super().setup(trainer)

    def _refuse_unsupported(self, trainer: "pl.Trainer", fitting: bool) -> None:
        plugin = self.precision_plugin
        if type(plugin) is not Precision and not (isinstance(plugin, MixedPrecision) and plugin.scaler is None):
            scaled = isinstance(plugin, MixedPrecision)
            raise ValueError(
                f"precision={getattr(plugin, 'precision', type(plugin).__name__)!r} is not supported by "
                "HybridParallelStrategy: "
                + ("its GradScaler unscales the dense gradients before the optimizer step, but FBGEMM has "
                   "already applied the scaled ones to the tables inside backward"
                   if scaled else
                   "it converts the module's parameters, but the tables keep the data type of their "
                   "EmbeddingBagConfig (FBGEMM)")
                + ". Use precision='bf16-mixed' (or '32-true'); for half-precision tables set data_type in the "
                "tables' configs"
            )
        if self._model_averaging_period is not None or type(self._ddp_comm_state).__name__ == "PostLocalSGDState":
            raise ValueError(
                "HybridParallelStrategy does not support model averaging (post-local SGD): the tables are "
                "sharded, not replicated, so there is nothing to average; remove ddp_comm_state / "
                "model_averaging_period, or use strategy='ddp' for a model without sharded tables"
            )
        if type(self.checkpoint_io) is not TorchCheckpointIO:
            # Lightning routes whole-file saves through a CheckpointIO plugin (AsyncCheckpointIO too); the
            # shards are written and read by torch.distributed.checkpoint, which would bypass it silently.
            raise ValueError(
                f"a CheckpointIO plugin ({type(self.checkpoint_io).__name__}, from Trainer(plugins=...) or the "
                "strategy's checkpoint_io) is not supported by HybridParallelStrategy: every rank writes and reads "
                "its own shards with torch.distributed.checkpoint, so the plugin would never see the checkpoints. "
                "Remove the plugin; to keep checkpoints elsewhere, copy the checkpoint directories, or save "
                "consolidate_checkpoint's one-file checkpoint with your own IO"
            )
        if not fitting:
            return
        averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, WEIGHT_AVERAGING_CALLBACKS)]
        if averaging:
            raise ValueError(
                f"{averaging[0]} keeps an averaged copy of every parameter, which for sharded tables would mean "
                "a full copy of each table on every rank (or a silently partial average). Average the dense "
                "parameters in your own callback, or use strategy='ddp' for a model whose tables fit one device"
            )
        if trainer.gradient_clip_val:
            # Measured: with clip 0.001 and SGD, a row looked up twice in a step moved by up to 0.002.
            raise ValueError(
                f"gradient_clip_val={trainer.gradient_clip_val} is not supported by HybridParallelStrategy: FBGEMM "
                "updates the sharded embedding tables inside backward and can only clip each lookup's gradient, "
                "where Lightning under DDP clips each row's summed gradient (by value) or all gradients at once "
                "(by norm), so any row looked up more than once in a step would train differently. " + CLIP_DENSE_ONLY
                + ", without Trainer(gradient_clip_val=...). Or use strategy='ddp' for a model whose tables fit one "
                "device"
            )
        # GradientAccumulationScheduler sets accumulate_grad_batches only as its epochs start.
        accumulating = trainer.accumulate_grad_batches > 1 or any(
            isinstance(c, GradientAccumulationScheduler) and c.going_to_accumulate_grad_batches()
            for c in trainer.callbacks
        )
        if accumulating:
            raise ValueError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} (or a GradientAccumulationScheduler "
                "that accumulates): FBGEMM's fused optimizer updates the embedding tables inside every "
                "backward, so they cannot accumulate gradients; raise the batch size instead"
            )
        tables = {id(m) for e in find_embedding_modules(self.lightning_module).values() for m in e.modules()}
        for callback in trainer.callbacks:
            if isinstance(callback, ModelPruning) and any(id(m) in tables for m in pruned_modules(callback)):
                raise ValueError(
                    "ModelPruning would prune embedding tables, which sharding replaces with TorchRec's own "
                    "(the masks would act on copies no step uses); list only dense modules in its "
                    "parameters_to_prune"
                )

    @override
    def model_to_device(self) -> None:
        # Tables may live on the meta device: sharding materialises and places them.
        self.model = self._shard(self.lightning_module)

    @override
    def configure_ddp(self) -> None:
        assert self._dmp is not None
        with torchrec_notices_silenced():
            self._dmp.init_data_parallel()
        self._ddp = _find_ddp(self._dmp)
        self.model = self._dmp
        self._register_ddp_hooks()

    @override
    def _register_ddp_hooks(self) -> None:
        # As DDPStrategy does (CUDA only), on the DDP that holds the dense parameters.
        if self.root_device.type == "cuda" and self._ddp is not None:
            register_ddp_comm_hook(
                model=self._ddp,
                ddp_comm_state=self._ddp_comm_state,
                ddp_comm_hook=self._ddp_comm_hook,
                ddp_comm_wrapper=self._ddp_comm_wrapper,
            )

    def _shard(self, module: "pl.LightningModule") -> DistributedModelParallel:
        if self._dmp is not None and self._dmp.module is module:
            return self._dmp
        sharded = sorted(name for name, m in module.named_modules() if isinstance(m, ShardedModule))
        if sharded:
            raise RuntimeError(
                f"{type(module).__name__}'s embedding modules {sharded} were sharded by another Trainer's "
                "HybridParallelStrategy, whose process group they are bound to. Go on with that Trainer "
                "(trainer.fit / validate / test / predict), or load a checkpoint into a new instance of the module "
                "(trainer.fit(new_module, ckpt_path=...), or consolidate_checkpoint and load_from_checkpoint)"
            )
        embedding_modules = find_embedding_modules(module)
        if not embedding_modules:
            raise TypeError(
                f"{type(module).__name__} has no torchrec EmbeddingBagCollection or EmbeddingCollection to shard; "
                "use strategy='ddp' for a model without embedding tables, or wrap plain nn.Embedding / "
                "nn.EmbeddingBag layers in lightning_dembed.DistributedEmbedding"
            )
        self._embedding_paths = list(embedding_modules)
        tables = {
            f"{path}.{name}": p for path, m in embedding_modules.items() for name, p in m.named_parameters()
        }
        self._table_groups, self._table_optimizers = self._choose_table_optimizers(module, tables)
        for optimizer in {id(o): o for o in self._table_optimizers.values()}.values():
            optimizer.check_device(self.root_device)
        self._embedding_optimizer = next(
            (o for o in self._table_optimizers.values() if o is not FROZEN_TABLE), FROZEN_TABLE
        )

        # Weights the user already initialised are kept; meta tables are initialised by TorchRec.
        initial_tables = {
            path: {k: v for k, v in m.state_dict().items() if not v.is_meta} for path, m in embedding_modules.items()
        }
        apply_embedding_optimizers(tables, self._table_optimizers)
        world_size = self.world_size
        local_world_size = self.num_processes
        budget = self._memory_budget or default_memory_budget(self.root_device, local_world_size)
        plan, summary = plan_sharding(
            module,
            self.policy,
            self._sharders,
            world_size=world_size,
            local_world_size=local_world_size,
            device=self.root_device,
            memory_budget=budget,
            optimizer_state_factor=max(o.state_factor for o in self._table_optimizers.values()),
            process_group=torch.distributed.group.WORLD,
        )
        self.sharding_plan, self.plan_summary = plan, summary
        self._refuse_frozen_replicated_tables(summary)
        rank_zero_info(f"HybridParallelStrategy sharding plan ({world_size} ranks):\n{summary}")
        _warn_of_plain_embedding_layers(module)

        with torchrec_notices_silenced():
            dmp = DistributedModelParallel(
                module,
                env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
                device=self.root_device,
                plan=plan,
                sharders=self._sharders,
                init_data_parallel=False,
                data_parallel_wrapper=self._data_parallel_wrapper,
            )
        lookups = {}
        for path, unsharded in embedding_modules.items():
            sharded = module.get_submodule(path)
            sharding_types = {table: ps.sharding_type for table, ps in plan.plan[path].items()}
            # Stateless (plain SGD), the fused updates add up; replicated tables train under DDP and
            # the dense optimizers, where gradients add up anyway.
            updates_add_up = all(
                not o.keeps_state
                for name, o in self._table_optimizers.items()
                if name.startswith(f"{path}.") and sharding_types[_table_name(name)] != "data_parallel"
            )
            lookups[path] = ShardedLookup(
                sharded, FeatureCheck.of(unsharded, path), set(sharding_types.values()), self._check_ids,
                self._control_group, updates_add_up,
            )
            # Its input is made in the step (managed collision, feature processors): nothing to start ahead,
            # and the batch's raw ids, exchanged ahead, would only waste exchanges (and trip TorchRec's range check).
            lookups[path].prefetching = not input_rewritten_by_wrapper(module, path)
            sharded.forward = lookups[path]
            register_output_order(sharded, unsharded)
            divide_only_row_wise_bags(sharded, unsharded, sharding_types)
            if initial_tables[path]:
                copy_full_into_sharded(sharded.state_dict(), initial_tables[path])
        # TorchRec's own DDP wrapping moves the whole module the same way; needed here when not fitting.
        module.to(self.root_device)
        # Outside fit DDPStrategy broadcasts rank 0's parameters and buffers (DDP's own start-up sync);
        # the shards differ per rank by design and must stay out of it.
        self._fused_tables = {name: p for name, p in dmp.named_parameters() if hasattr(p, "_in_backward_optimizers")}
        dmp._ddp_params_and_buffers_to_ignore = list(self._fused_tables)
        self._dmp, self._ddp = dmp, None
        self._pipeline = LookupPipeline(lookups)
        self._say_what_model_summary_counts(module.trainer, summary)
        return dmp

    def _say_what_model_summary_counts(self, trainer: "pl.Trainer", summary: PlanSummary) -> None:
        """ModelSummary counts parameters as rank 0 holds them: say how far that is from the sharded tables' size."""
        if trainer.state.fn != TrainerFn.FITTING or not any(isinstance(c, ModelSummary) for c in trainer.callbacks):
            return
        held = sum(p.numel() for p in self._fused_tables.values())
        sharded = sum(t.num_embeddings * t.embedding_dim for t in summary.tables if t.sharding_type != "data_parallel")
        if held != sharded:
            rank_zero_info(
                f"ModelSummary counts the sharded tables' parameters that rank 0 holds: {held:,} of {sharded:,} "
                "(the plan above has every table's size)"
            )

    def _refuse_frozen_replicated_tables(self, summary: PlanSummary) -> None:
        # Replicated tables share one dense kernel trained by DDP and the dense optimizers, which
        # cannot leave one of them out; the learning-rate-0 kernel only exists for sharded tables.
        frozen = {_table_name(name) for name, o in self._table_optimizers.items() if o is FROZEN_TABLE}
        replicated = sorted(t.name for t in summary.tables if t.name in frozen and t.sharding_type == "data_parallel")
        if replicated:
            raise ValueError(
                f"tables {replicated} are frozen (requires_grad=False) and planned data_parallel, where they "
                "would train; shard them instead, e.g. HybridParallelStrategy(sharding_types={"
                + ", ".join(f"'{t}': 'table_wise'" for t in replicated) + "})"
            )

    def _choose_table_optimizers(
        self, module: "pl.LightningModule", tables: dict[str, nn.Parameter]
    ) -> tuple[dict[str, ParamGroupRef], dict[str, EmbeddingOptimizer]]:
        """Each table's param group and the fused optimizer its kernel is built with.

        A table trains with the hyper-parameters of the param group that holds it (the fused twin of
        that group's optimizer); a table in no group (the optimizers got ``dense_parameters(self)``,
        every parameter but the tables) with those of the first optimizer's first group, schedule
        included. An explicit ``embedding_optimizer`` fixes them instead.
        """
        optimizers, schedulers = init_optimizers_and_lr_schedulers(module)
        # A frozen table (requires_grad=False) gets SGD at learning rate 0: FBGEMM updates every table
        # it shards, and an update of zero leaves the table as it stays under DDP.
        frozen = {name: FROZEN_TABLE for name, p in tables.items() if not p.requires_grad}
        trainable = {name: p for name, p in tables.items() if p.requires_grad}
        held = table_param_groups(optimizers, trainable)
        explicit = self._explicit_embedding_optimizer
        if explicit is not None:
            scheduled = {id(config.scheduler.optimizer) for config in schedulers}
            clash = sorted(name for name, ref in held.items() if id(optimizers[ref.optimizer]) in scheduled)
            if clash:
                raise ValueError(
                    f"embedding_optimizer= fixes the tables' hyper-parameters, but configure_optimizers puts tables "
                    f"{clash} in an optimizer with an LR scheduler, whose schedule they would then not follow. Drop "
                    "embedding_optimizer= (the tables follow their param group and its schedule), or give that "
                    "optimizer lightning_dembed.dense_parameters(self)"
                )
            return {}, {**{name: explicit for name in trainable}, **frozen}
        if not optimizers:
            raise ValueError(
                "configure_optimizers returned no optimizer to derive the embedding tables' optimizer from; return "
                "one, or pass HybridParallelStrategy(embedding_optimizer=EmbeddingOptimizer(...))"
            )
        groups = {name: held.get(name, ParamGroupRef(0, 0)) for name in trainable}
        chosen = {}
        for name, ref in groups.items():
            optimizer = optimizers[ref.optimizer]
            try:
                chosen[name] = EmbeddingOptimizer.from_param_group(optimizer, optimizer.param_groups[ref.group])
            except ValueError as error:
                if name in held:
                    raise
                unheld = sorted(set(trainable) - set(held))
                raise ValueError(
                    f"tables {unheld} are in no param group of configure_optimizers, so they train with the first "
                    f"optimizer's first group ({type(optimizer).__name__}): {error}"
                ) from error
        return groups, {**chosen, **frozen}

    def _dense_ddp(self) -> Optional[DistributedDataParallel]:
        """The DDP that TorchRec wraps around the dense parameters (None before fit's setup)."""
        return self._ddp

    # Lightning's DDPStrategy drives its reducer by hand under manual optimization, for a DDP at the
    # top of the model; these do the same for the DDP inside DistributedModelParallel.

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        # Lightning installs its signal handlers after setup; here they are in place.
        self._signals = _SignalsAtStepStart.install(self.lightning_module.trainer, self.cluster_environment,
                                                    self._control_group)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._signals is not None:
            self._signals.at_step_start()  # before anything of this step: a checkpoint between two steps
        # The tables are updated inside this step's backward with the learning rate their kernels read
        # in its forward: they take their param groups' current values first.
        if self._table_hyper_parameters is not None:
            self._table_hyper_parameters.sync(self.optimizers)
        if self._pipeline is not None:
            self._pipeline.forget_forwards()  # the last step's may have had no backward (a skipped one)
        self._check_every_rank_has_this_batch()
        loss = super().training_step(*args, **kwargs)
        if self._pipeline is not None:
            # The next batch's ids travel during this batch's backward.
            self._pipeline.splits_done()
        return loss

    def _check_every_rank_has_this_batch(self) -> None:
        """Fail on every rank, not hang, when the ranks' train dataloaders run out at different steps.

        Every step exchanges embeddings between all ranks, so a rank whose data ends early would
        leave the others waiting in a collective (or pair their lookup with its next collective).
        Ranks whose dataloaders have lengths compare them once per epoch (host-side, gloo). Without
        lengths, Lightning still knows one batch ahead whether a batch is a rank's last, and the
        ranks compare that every step; a rank that goes on reads the result at its next step, so
        the comparison never stalls a step, and a rank at its last batch waits for it.
        """
        trainer = self.lightning_module.trainer
        loop = trainer.fit_loop.epoch_loop
        if self._epoch_lengths_agree(trainer):
            return
        if self._batch_check is not None:
            self._batch_check.verify()
        ends = bool(
            loop.batch_progress.is_last_batch
            or loop.batch_idx + 1 >= trainer.num_training_batches
            or (trainer.max_steps != -1 and trainer.global_step + 1 >= trainer.max_steps)
        )
        check = _BatchCountCheck(ends, self.global_rank, trainer.current_epoch, loop.batch_idx, self._control_group)
        self._batch_check = None if ends else check
        if ends:
            check.verify()

    def _epoch_lengths_agree(self, trainer: "pl.Trainer") -> bool:
        """`_compare_epoch_lengths`, once per epoch (the pipelined loader asks first, as the epoch starts)."""
        epoch = trainer.current_epoch
        if self._lengths_agree_in_epoch is None or self._lengths_agree_in_epoch[0] != epoch:
            self._lengths_agree_in_epoch = (epoch, self._compare_epoch_lengths(trainer))
        return self._lengths_agree_in_epoch[1]

    def _compare_epoch_lengths(self, trainer: "pl.Trainer") -> bool:
        """Whether every rank's train dataloader has the same known length (else check every step)."""
        length = trainer.num_training_batches
        known = length != float("inf")
        mine = int(length) if known else -1
        extremes = torch.tensor([mine, -mine], dtype=torch.int64)
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX, group=self._control_group)
        longest, shortest = int(extremes[0]), -int(extremes[1])
        if shortest == -1 or longest == -1:
            return False
        if longest != shortest:
            raise RuntimeError(
                f"rank {self.global_rank}: the ranks' train dataloaders have different lengths in epoch "
                f"{trainer.current_epoch} (from {shortest} to {longest} batches; this rank's: {mine}). Sharded "
                "lookups and DDP need every rank in every step: make each rank yield the same number of batches "
                "(a DistributedSampler with drop_last=True, or limit_train_batches)"
            )
        return True

    @override
    def process_dataloader(self, dataloader: object) -> object:
        if not self._pipeline_enabled or self._pipeline is None:
            return dataloader  # turned off, or nothing sharded yet
        trainer = self.lightning_module.trainer
        if not trainer.training:
            return dataloader  # validation, test, predict: looked up once, nothing to run ahead of
        if callable(getattr(dataloader, "state_dict", None)):
            # A stateful loader's checkpointed position would be one batch past the step's.
            rank_zero_info("HybridParallelStrategy: the train dataloader saves its own state; training unpipelined")
            return dataloader
        to_device: Callable[[Any], Any] = lambda batch: batch  # noqa: E731
        if self.root_device.type != "cpu":
            hooks = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
            owners = [self.lightning_module, trainer.datamodule]
            if any(owner is not None and is_overridden(hook, owner) for hook in hooks for owner in owners):
                # The input stage needs the batch on the device before Lightning's transfer, and
                # running the user's transfer hooks early would change what they see.
                rank_zero_info("HybridParallelStrategy: batch transfer hooks are overridden; training unpipelined")
                return dataloader
            to_device = lambda batch: move_data_to_device(batch, self.root_device)  # noqa: E731
        return PipelinedLoader(dataloader, self._pipeline, to_device, lambda: self._epoch_lengths_agree(trainer))

    @override
    def on_train_end(self) -> None:
        if self._signals is not None:
            self._signals.close()
            self._signals = None
        # Exchanges started ahead for batches past max_steps or limit_train_batches: finish them on
        # every rank before the ranks go their own ways.
        if self._pipeline is not None:
            self._pipeline.drain()

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._skip_nonfinite_loss and not self._finite_on_every_rank(closure_loss):
            # No backward on any rank: FBGEMM updates nothing, the dense gradients stay None (their
            # optimizers skip them), and DDP's reducer is never armed.
            rank_zero_warn(
                f"step {self.lightning_module.trainer.global_step}: the loss is not finite on at least one rank; "
                "its backward and update are skipped on every rank (skip_nonfinite_loss=True)"
            )
            return closure_loss
        self._refuse_second_backward_before_a_step()
        if self._table_hyper_parameters is not None:
            self._table_hyper_parameters.check_learning_rates_kept(self.optimizers)
        # Only a backward through a trained lookup updates tables (not one of a loss that detached
        # them, nor with every table frozen).
        self._backward_since_step = self._pipeline is not None and any(
            lookup.forwards_since_backward for lookup in self._pipeline.lookups.values()
        ) and any(o is not FROZEN_TABLE for o in self._table_optimizers.values())
        loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        if self._pipeline is not None:
            self._pipeline.forget_forwards()
        return loss

    def _refuse_second_backward_before_a_step(self) -> None:
        # Under DDP, two backwards add up their gradients for one step of the optimizer that holds the
        # tables, and a backward whose step never comes leaves them as they are; here FBGEMM applied
        # the first backward to the tables already.
        if self._backward_since_step:
            tables = sorted({table for held in self._trained_tables_by_optimizer.values() for table in held})
            raise ValueError(
                "a backward ran again before the optimizer that holds the embedding tables"
                f"{' ' + str(tables) if tables else ''} stepped (manual_backward twice, optimizers stepped on "
                "alternate batches, or an optimizer_step override that skips optimizer.step), but FBGEMM updated "
                "the tables inside the first backward already: under strategy='ddp' their gradients would have "
                "added up, or waited for that optimizer's step. Step the optimizer that holds the tables after "
                "every backward that reaches them (sum the losses and backward once per step), or keep the "
                "tables out of the losses whose step is skipped (detach the embeddings there)"
            )

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # Under automatic optimization the backward runs inside this call (in the closure).
        result = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._steps_tables(optimizer):
            if self._backward_since_step and self._table_hyper_parameters is not None:
                # A rate set after the backward (on_before_optimizer_step, a scheduler stepped before
                # optimizer.step) moved the dense parameters only.
                self._table_hyper_parameters.check_learning_rates_kept(
                    self.optimizers, between="the backward and the optimizer step"
                )
            self._backward_since_step = False
        return result

    def _steps_tables(self, optimizer: Any) -> bool:
        """Whether stepping ``optimizer`` is the step of the tables' updates (tables in no optimizer follow the first)."""
        if self._trained_tables_by_optimizer:
            return id(optimizer) in self._trained_tables_by_optimizer
        return optimizer is self.optimizers[0]

    def _finite_on_every_rank(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    @override
    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        ddp = self._dense_ddp()
        if ddp is not None and not self.lightning_module.automatic_optimization:
            prepare_for_backward(ddp, closure_loss)

    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        self._refuse_gradients_of_table_weights()
        ddp = self._dense_ddp()
        if ddp is None or self.lightning_module.automatic_optimization or not ddp.static_graph:
            return
        if not self._static_graph_flushed:
            flush_first_static_graph_iteration(ddp)
            self._static_graph_flushed = True

    def _refuse_gradients_of_table_weights(self) -> None:
        # The fused kernels take the lookups' gradients inside backward and leave .grad alone: a
        # .grad on a table's weight comes from a loss that read the weight itself.
        touched = sorted(name for name, p in self._fused_tables.items() if p.grad is not None)
        if touched:
            raise ValueError(
                f"the loss reached {touched} other than through their lookup (a penalty over self.parameters(), "
                "a table's weight read in forward): each rank holds only its shard of a table, and FBGEMM applies "
                "the lookups' gradients only, so under strategy='ddp' this term would train the tables and here it "
                "would not. Compute penalties over lightning_dembed.dense_parameters(self), or use strategy='ddp'"
            )

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        super().setup_optimizers(trainer)
        # Each group's parameters as configure_optimizers gave them, tables included: what a
        # checkpoint written under strategy="ddp" numbers its optimizer state by.
        self._configured_param_names = self._param_names_by_group()
        trainable = {name for name, o in self._table_optimizers.items() if o is not FROZEN_TABLE}
        if self._explicit_embedding_optimizer is None:  # checked every fit: the kernels may come from validate
            refuse_hand_picked_parameters_without_tables(
                self.lightning_module.named_parameters(),
                {name for groups in self._configured_param_names for group in groups for name in group},
                self._table_optimizers,
                trainable,
            )
        # Tables are stepped inside backward by FBGEMM; keep them out of the dense optimizers.
        dropped_bytes = 0
        self._trained_tables_by_optimizer = {}
        for optimizer, names in zip(self.optimizers, self._configured_param_names):
            for group in optimizer.param_groups:
                dense = dict(in_backward_optimizer_filter((str(i), p) for i, p in enumerate(group["params"])))
                for p in group["params"]:
                    if all(p is not q for q in dense.values()):
                        state = optimizer.state.pop(p, {})
                        dropped_bytes += sum(t.nbytes for t in state.values() if isinstance(t, torch.Tensor))
                group["params"] = list(dense.values())
            held = sorted({name for group in names for name in group if name in trainable})
            if held:
                self._trained_tables_by_optimizer[id(optimizer)] = held
        if self._trained_tables_by_optimizer:
            # Lightning's clip_gradients (configure_gradient_clipping, manual optimization) clips what
            # the optimizer holds, which under DDP includes these tables: refuse it for them (teardown
            # removes the check).
            self.precision_plugin.clip_gradients = self._clip_gradients_of_dense_optimizers  # type: ignore[method-assign]
        if self._dmp is not None:
            self._start_table_optimizer_state_afresh(self._dmp.fused_optimizer)
        if self._dmp is not None and self._table_groups:
            self._table_hyper_parameters = TableHyperParameters(
                self._dmp.fused_optimizer, self._table_groups, self._table_optimizers
            )
        if dropped_bytes:
            rank_zero_warn(
                f"configure_optimizers gave its optimizer the embedding tables too, and it allocated "
                f"{dropped_bytes / 2**20:.0f} MiB of state for this rank's table shards, now dropped (tables train "
                "with their fused optimizer). Pass lightning_dembed.dense_parameters(self) instead of "
                "self.parameters() to avoid the allocation."
            )

    @staticmethod
    @torch.no_grad()
    def _start_table_optimizer_state_afresh(fused_optimizer: Any) -> None:
        # Every fit starts from new optimizers under DDP (configure_optimizers runs again), while the
        # fused kernels of an already sharded module (a second fit on one Trainer) kept their state.
        # Zero is where FBGEMM starts it (initial accumulators other than 0 are refused); a resume
        # loads the saved state after this.
        for state in fused_optimizer.state.values():
            for value in state.values():
                for local in local_tensors(value):
                    local.zero_()

    def _clip_gradients_of_dense_optimizers(
        self,
        optimizer: Any,
        clip_val: Union[int, float] = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        """The precision plugin's ``clip_gradients``, refused for an optimizer configured with tables."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        tables = self._trained_tables_by_optimizer.get(id(optimizer), [])
        if clip_val > 0 and tables:
            # Under DDP these tables' gradients would be clipped too (or count in the norm), but FBGEMM
            # has already applied them, unclipped, inside backward.
            raise ValueError(
                f"clip_gradients({type(optimizer).__name__}, {clip_val}, {gradient_clip_algorithm.value!r}): "
                f"configure_optimizers gave this optimizer the embedding tables {tables}, whose gradients DDP would "
                "clip with the rest, but FBGEMM updates them inside backward, before any clipping. "
                + CLIP_DENSE_ONLY
            )
        type(self.precision_plugin).clip_gradients(self.precision_plugin, optimizer, clip_val, gradient_clip_algorithm)

    # -- checkpoints -----------------------------------------------------------------------------

    def _embedding_optimizer_state(self) -> dict[str, Any]:
        """The tables' fused optimizer state, as DCP saves and loads it (empty when no table keeps any)."""
        assert self._dmp is not None
        # Only the tables with optimizer state: DCP writes a container without tensors (SGD's empty
        # state) from rank 0 alone, so one that only another rank holds would be missing at load.
        stateful = {name: s for name, s in self._dmp.fused_optimizer.state_dict()["state"].items() if s}
        return {"embedding_optimizer": {"state": stateful}} if stateful else {}

    def table_state_keys(self, state_dict: Mapping[str, Any]) -> list[str]:
        """The keys of ``state_dict`` (the module's) that belong to the embedding tables (after setup)."""
        return [key for key in state_dict if any(key.startswith(path + ".") for path in self._embedding_paths)]

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # The module's own state dict, its tables as sharded tensors (views of the shards): the
        # on_save_checkpoint hooks see and may edit it as under DDP, and save_checkpoint writes it
        # with DCP; sharded tensors never pass through torch.save.
        return self.lightning_module.state_dict()

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Union[str, Path], storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("HybridParallelStrategy writes checkpoints with torch.distributed.checkpoint; "
                            "storage_options is not supported")
        if self._dmp is None:
            # Nothing sharded here: before setup or after a failed one (OnExceptionCheckpoint), or in the
            # launching process of a spawn/fork run, which holds the tables handed back.
            self._save_unsharded_checkpoint(checkpoint, filepath)
            return
        if self._backward_since_step:
            # Under DDP such a checkpoint holds the weights before the step, which a resume runs again.
            raise CheckpointError(
                f"{filepath} not saved: it would fall between a backward and its optimizer step, where FBGEMM has "
                f"updated the tables for step {self.lightning_module.trainer.global_step} already and the dense "
                "parameters not; a resume would run that step again and update the tables twice. The checkpoints "
                "saved before are kept"
            )
        state = checkpoint["state_dict"]
        meta = {key: value for key, value in checkpoint.items() if key != "state_dict"}
        # consolidate_checkpoint marks these to load by assignment, into tables built on meta.
        meta["lightning_dembed"] = {
            "table_keys": self.table_state_keys(state),
            "replicated_tables": self._stateful_replicated_tables(),
        }
        tensors = {"state_dict": state}
        if "optimizer_states" in checkpoint:
            tensors.update(self._embedding_optimizer_state())
            # A warm start from the consolidated file matches the dense optimizers' state by these names:
            # another plan may replicate other tables, which changes what the dense optimizers hold.
            meta["lightning_dembed"]["optimizer_param_names"] = self._param_names_by_group()
        save_sharded_checkpoint(
            filepath,
            tensors,
            meta,
            is_global_zero=self.is_global_zero,
            broadcast=lambda obj, src: self.broadcast(obj, src=src),
        )

    def _save_unsharded_checkpoint(self, checkpoint: dict[str, Any], filepath: Union[str, Path]) -> None:
        """One plain file, as DDP writes it, of a module this strategy has not sharded (``load_checkpoint``
        reads it as a warm start); refused where the module holds tables sharded elsewhere or still on meta."""
        module = self.lightning_module
        unsaveable = [name for name, m in module.named_modules() if isinstance(m, ShardedModule)] + [
            key for key, value in checkpoint["state_dict"].items() if isinstance(value, torch.Tensor) and value.is_meta
        ]
        if not unsaveable:
            super().save_checkpoint(checkpoint, filepath)
            return
        message = (
            f"{filepath} not saved: {unsaveable[:3]} are not in this process's memory (tables on the meta "
            "device, or sharded by another Trainer) and HybridParallelStrategy has not sharded this module"
        )
        if module.trainer.state.status == TrainerStatus.INTERRUPTED:
            # OnExceptionCheckpoint after a failed setup: the error that stopped the run is the one to see.
            rank_zero_warn(message + " (the run failed before sharding it)")
            return
        raise CheckpointError(message + ": save after fit, validate, test or predict has set it up")

    @override
    def load_checkpoint(self, checkpoint_path: Union[str, Path], weights_only: Optional[bool] = None) -> dict[str, Any]:
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if Path(checkpoint_path).is_file():
            return self._load_full_checkpoint(checkpoint_path, weights_only, fitting)
        meta, saved = read_sharded_checkpoint(checkpoint_path, weights_only)
        module = self.lightning_module
        state = module.state_dict()
        in_checkpoint = saved_keys(saved)
        # What both hold loads in place into the module (its tables' shards). Where the module's
        # on_load_checkpoint may rename, drop or add keys, what only the checkpoint holds loads
        # in full, as from a file under DDP, and load_model_state_dict checks the keys the hooks
        # left; else they are checked here, by name, without loading what would be refused or unused.
        saved_only: dict[str, Any] = {}
        if is_overridden("on_load_checkpoint", module):  # callbacks' hooks run after the weights load
            saved_only = saved_only_entries(saved, state)
        elif module.strict_loading:
            refuse_mismatched_keys(
                type(module).__name__, state.keys() - in_checkpoint, in_checkpoint - state.keys(), checkpoint_path
            )
        tensors: dict[str, Any] = {
            "state_dict": {**{key: value for key, value in state.items() if key in in_checkpoint}, **saved_only}
        }
        if fitting and "optimizer_states" in meta:  # else weights only: Lightning names that itself
            self._refuse_moved_optimizer_state(meta, checkpoint_path)
            tensors.update(self._embedding_optimizer_state())
            optimizer_state = {"embedding_optimizer": tensors.get("embedding_optimizer", {})}
            unsaved = unsaved_tensors(optimizer_state, saved)
            if unsaved:
                raise CheckpointError(
                    f"{checkpoint_path} holds no optimizer state for {unsaved}: the tables were saved under other "
                    "names (on_load_checkpoint renames weights only) or with an optimizer that keeps none. Resume "
                    "with the tables' names and optimizer as saved, or warm start from consolidate_checkpoint's "
                    "file, where their optimizer state starts fresh"
                )
            reshaped = reshaped_tensors(optimizer_state, saved)
            if reshaped:
                # RowWiseAdagrad keeps one sum per row of each column shard: column-wise sharding over
                # another number of shards changes the state's shape, which DCP cannot reshard.
                raise CheckpointError(
                    f"{checkpoint_path}: optimizer state of this rank's tables has another shape in this plan "
                    f"({', '.join(f'{key} saved as {was}, {now} here' for key, (was, now) in reshaped.items())}): "
                    "RowWiseAdagrad keeps one sum per row of each column shard, so sharding a table column-wise over "
                    "another number of shards changes it. Pin the tables' sharding_types (and ranks) as saved, or "
                    "warm start from consolidate_checkpoint's file, where their optimizer state starts fresh"
                )
        load_sharded_tensors(checkpoint_path, tensors)  # read_sharded_checkpoint checked the files above
        if "embedding_optimizer" in tensors:
            assert self._dmp is not None
            fused = self._dmp.fused_optimizer.state_dict()
            fused["state"].update(tensors["embedding_optimizer"]["state"])
            self._dmp.fused_optimizer.load_state_dict(fused)
        meta["state_dict"] = tensors["state_dict"]
        return meta

    def _stateful_replicated_tables(self) -> list[str]:
        """The tables planned data_parallel whose optimizer keeps state (it sits in the dense optimizers)."""
        assert self.plan_summary is not None
        replicated = {table.name for table in self.plan_summary.tables if table.sharding_type == "data_parallel"}
        return sorted(
            _table_name(name) for name, optimizer in self._table_optimizers.items()
            if optimizer.keeps_state and _table_name(name) in replicated
        )

    def _refuse_moved_optimizer_state(self, meta: Mapping[str, Any], checkpoint_path: Union[str, Path]) -> None:
        # A replicated table's optimizer state lives in the dense optimizers, a sharded one's in its
        # fused kernel; a plan that moves a table between the two (another world size can) has no
        # place to put the saved state.
        info = meta.get("lightning_dembed", {})
        if "replicated_tables" not in info:
            return  # written before lightning-dembed recorded them
        saved, now = set(info["replicated_tables"]), set(self._stateful_replicated_tables())
        if saved != now:
            pinned = {name: "data_parallel" if name in saved else "row_wise" for name in sorted(saved ^ now)}
            raise CheckpointError(
                f"{checkpoint_path}: tables {sorted(saved ^ now)} keep optimizer state and were planned "
                f"data_parallel {'when saved' if saved - now else 'now'} but not "
                f"{'now' if saved - now else 'when saved'}; their saved state has no place in this plan. Pin them "
                f"as saved (HybridParallelStrategy(sharding_types={pinned})), or warm start from "
                "consolidate_checkpoint's file, which holds the optimizer state of the tables replicated when saved "
                "(not of those sharded: theirs starts fresh)"
            )

    def _load_full_checkpoint(
        self, checkpoint_path: Union[str, Path], weights_only: Optional[bool], fitting: bool
    ) -> dict[str, Any]:
        """Warm start from one file: a consolidated checkpoint, or one written under strategy="ddp"."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if fitting:
            self._fill_optimizer_states(checkpoint, checkpoint_path)
        return checkpoint

    def _fill_optimizer_states(self, checkpoint: dict[str, Any], checkpoint_path: Union[str, Path]) -> None:
        """The optimizer states of a full checkpoint, in the form this strategy's optimizers take them.

        Matched by parameter name. Written under ``strategy="ddp"`` (its groups also hold the
        tables): the dense parameters' state goes to the dense optimizers, the tables' to their
        fused kernels, so training goes on as under DDP. Consolidated from this strategy's
        checkpoint (which names the dense optimizers' parameters): the dense state goes back to
        the parameters it was saved for, also where the plan replicates other tables now; a table
        replicated when saved and sharded now takes its saved state into its fused kernel where
        that kernel can take it. What the file lacks starts fresh, with a warning naming it: the
        fused state of the tables sharded when saved, and the state of parameters it has none for.
        """
        saved = checkpoint.get("optimizer_states") or []
        kept = self._param_names_by_group()
        info = checkpoint.get("lightning_dembed", {})

        def sizes(groups: list[list[list[str]]]) -> list[list[int]]:
            return [[len(group) for group in optimizer] for optimizer in groups]

        saved_sizes = [[len(group["params"]) for group in state["param_groups"]] for state in saved]
        replicated = self._stateful_replicated_tables()  # their state is the dense optimizers'
        consolidated = "optimizer_param_names" in info
        if consolidated:
            saved_names = info["optimizer_param_names"]
        elif saved_sizes == sizes(self._configured_param_names):  # strategy="ddp" (or no table in a group)
            saved_names = self._configured_param_names
        elif info.get("replicated_tables", []) == replicated:
            saved_names = kept  # consolidated before the names were saved, under the same plan
        else:
            saved_names = []
        table_states: dict[str, Any] = {}
        fresh = []
        if not saved or saved_sizes != sizes(saved_names):
            checkpoint["optimizer_states"] = [optimizer.state_dict() for optimizer in self.optimizers]
            fresh.append("the dense optimizers' state")
        else:
            states, unsaved, given_up = [], [], {}
            for state, names, now, optimizer in zip(saved, saved_names, kept, self.optimizers):
                dense, gone = split_saved_optimizer_state(state, names, now)
                initial = optimizer.state_dict()["state"]  # what the optimizer would start from
                for number, name in enumerate(name for group in now for name in group):
                    if number in dense["state"]:
                        continue
                    if number in initial:
                        dense["state"][number] = initial[number]
                    if number in initial or state["state"]:  # else no parameter had state yet (lazy, or none kept)
                        unsaved.append(name)
                states.append(dense)
                given_up.update(gone)
            checkpoint["optimizer_states"] = states
            for name, param_state in given_up.items():
                # Only tables sharded now take saved state (a strategy="ddp" file's is refused where it does not map).
                table_optimizer = self._table_optimizers.get(name)
                if table_optimizer is not None and (not consolidated or table_optimizer.takes_state_from(param_state)):
                    table_states[name] = param_state
            if unsaved:
                fresh.append(f"the optimizer state of {sorted(unsaved)}")
            unused = sorted(set(given_up) - set(table_states))
            if unused:
                rank_zero_warn(
                    f"{checkpoint_path}: the saved optimizer state of {unused} is not used: no optimizer holds them now, "
                    "or their fused kernel cannot take it"
                )
        self._load_table_optimizer_states(table_states)
        stateful = sorted(
            _table_name(name) for name, o in self._table_optimizers.items()
            if o.keeps_state and name not in table_states and _table_name(name) not in replicated
        )
        if stateful:
            fresh.append(f"the fused optimizer state of tables {stateful}")
        if fresh:
            rank_zero_warn(
                f"{checkpoint_path} is a full checkpoint without all of this run's optimizer state (consolidated, "
                f"or weights only): weights, loop progress and LR schedules are restored; {' and '.join(fresh)} "
                "start fresh. Resume from this strategy's sharded checkpoint to restore all of it."
            )
        checkpoint.setdefault("lr_schedulers", [config.scheduler.state_dict() for config in self.lr_scheduler_configs])

    def _param_names_by_group(self) -> list[list[list[str]]]:
        """The name of each parameter of each param group of each optimizer."""
        name_of = {id(p): name for name, p in self.lightning_module.named_parameters()}
        return [
            [
                [name_of.get(id(p), f"<not the module's: optimizer {i}, group {j}, parameter {k}>")
                 for k, p in enumerate(group["params"])]
                for j, group in enumerate(optimizer.param_groups)
            ]
            for i, optimizer in enumerate(self.optimizers)
        ]

    def _load_table_optimizer_states(self, saved: Mapping[str, Mapping[str, Any]]) -> None:
        """Each table's saved torch optimizer state (by parameter name) into its fused kernel's shards."""
        assert self._dmp is not None
        if not saved:
            return
        full: dict[str, torch.Tensor] = {}
        for name, state in saved.items():
            full.update(self._table_optimizers[name].fused_state_from(_table_name(name), state))
        fused = self._dmp.fused_optimizer.state_dict()
        for table_state in fused["state"].values():
            copy_full_into_sharded(table_state, full)
        self._dmp.fused_optimizer.load_state_dict(fused)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # What on_load_checkpoint left: a sharded checkpoint's weights are in the shards already
        # (copying them onto themselves is skipped); full tensors, a hook's edits included, are copied
        # into each rank's slices.
        state = checkpoint["state_dict"]
        module = self.lightning_module
        target = module.state_dict()
        if strict:  # else, as Module.load_state_dict(strict=False), the keys both have
            refuse_mismatched_keys(type(module).__name__, target.keys() - state.keys(), state.keys() - target.keys())
        copy_full_into_sharded(target, state)
        set_extra_states(module, state)

    @override
    def remove_checkpoint(self, filepath: Union[str, Path]) -> None:
        if self.is_global_zero:
            remove_sharded_checkpoint(filepath)

    # -- teardown --------------------------------------------------------------------------------

    @override
    def teardown(self) -> None:
        # The base teardown moves the module to CPU, which sharded (and meta) tables cannot do.
        self.model = self.lightning_module
        if self._signals is not None:  # a failed run skipped on_train_end
            self._signals.release()
            self._signals = None
        assert self.accelerator is not None
        vars(self.precision_plugin).pop("clip_gradients", None)  # setup_optimizers' check
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

