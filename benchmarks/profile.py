r"""Where the decoder's time goes: its training step and beam search, per op.

Traces `benchmark.py`'s decoder training step and batched beam search with
the JAX profiler, reads back the time of every operation XLA:CPU ran, and
groups it by what the operation is:

- matmuls, split by who runs them: a library kernel (`__ynn_fusion`,
  XLA:CPU's YNNPACK matmuls, which use the CPU's bfloat16 dot product
  and, where present, AMX instructions) or XLA's own `dot` (batched and
  transposed-operand dots the library path does not take);
- casts (`convert`), layout copies and transposes, broadcasts (zero
  fills), and the remaining elementwise work and reductions;
- by phase: the forward pass, the backward pass (`transpose(jvp(...))` in
  the op's metadata), the optimizer update, and whether the op runs inside
  a loop (the recurrence's scans, beam search's while loop).

  python benchmarks/profile.py                        # both parts, both dtypes
  python benchmarks/profile.py --parts=train --dtypes=bfloat16 --top=20

Sizes come from `benchmark.py`'s flags (`--batch_size`, `--vocab_size`,
`--beam_batch`, ...). Operations may overlap (XLA:CPU runs independent ones
at once), so the summed op time can exceed the wall time; the shares are of
the summed time. Needs `--xla_cpu_enable_xprof_traceme`, added to XLA_FLAGS
here before JAX starts; a jaxlib without it gets a one-line error.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
from visionspeak_jax.platform import cpu_tuning

if __name__ == "__main__":  # First, before JAX: this may start it again.
  cpu_tuning.reexec(__file__)

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmark
from visionspeak_jax.models import captioner
# pylint: enable=g-import-not-at-top,wrong-import-position

TRACE_FLAG = "xla_cpu_enable_xprof_traceme"

_PARTS = flags.DEFINE_list("parts", ["train", "beam"],
                           "What to profile: train, beam.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"],
                            "Matmul dtypes (config.dtype / decode_dtype).")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 5,
                                      "Traced calls per part and dtype.")
_PROFILE_BEAM = flags.DEFINE_integer("profile_beam", 5, "Beam width traced.")
_TOP = flags.DEFINE_integer("top", 12, "Slowest single ops listed.")


class Op(NamedTuple):
  """One instruction of a compiled program, as its HLO text gives it."""
  name: str
  opcode: str  # `fusion`, `dot`, `while`, ...
  shape: str  # The result's shape, e.g. `f32[32,512]{1,0}`.
  kind: str  # What the op does, for grouping (`kind_of`).
  phase: str  # forward, backward, update (training), or "" (decoding).
  in_loop: bool  # Inside a while loop's body (a scan, beam search).
  flops: float  # 2 x multiply-adds of the matmul it runs, else 0.
  operands: str  # Operand dtypes of its matmul, e.g. `bf16 x bf16`.


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) (?:\(.*\) -> .*)?\{$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?:\[[^\]]*\](?:\{[^}]*\})?)?|\(.*?\)) "
    r"([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^(\w+)\[([\d,]*)\]")


def _dims(shape: str) -> tuple[str, list[int]]:
  m = _SHAPE.match(shape)
  if not m:
    return "", []
  return m.group(1), [int(d) for d in m.group(2).split(",") if d]


def _dot_flops(line_rest: str, out_shape: str,
               shapes: dict[str, str]) -> tuple[float, str]:
  """FLOPs and operand dtypes of a dot from its HLO operands and dims."""
  names = re.findall(r"%([\w.\-]+)", line_rest.split(")", 1)[0])
  if len(names) < 2:
    return 0.0, ""
  lhs_type, lhs = _dims(shapes.get(names[0], ""))
  rhs_type, _ = _dims(shapes.get(names[1], ""))
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line_rest)
  k = 1
  if contracting and lhs:
    for d in contracting.group(1).split(","):
      if d:
        k *= lhs[int(d)]
  _, out = _dims(out_shape)
  return 2.0 * float(np.prod(out or [1])) * k, f"{lhs_type} x {rhs_type}"


def kind_of(opcode: str, name: str, body: str) -> str:
  """Groups an op by what it does, from its opcode and fused computation."""
  if opcode == "fusion" and "__ynn_fusion" in body:
    return "matmul, library (YNNPACK)" if " dot(" in body else "library, other"
  if opcode == "dot" or (opcode == "fusion" and " dot(" in body):
    return "matmul, XLA dot"
  if opcode == "convolution" or (opcode == "fusion"
                                 and " convolution(" in body):
    return "convolution"
  ops = set(re.findall(r" ([a-z\-]+)\(", body)) - {"parameter", "bitcast",
                                                     "constant"}
  if opcode == "fusion" and not ops:
    ops = {name.split(".")[0].replace("wrapped_", "")}
  if opcode != "fusion":
    ops = {opcode}
  if ops <= {"convert"}:
    return "cast (convert)"
  if ops & {"copy", "transpose"} and ops <= {"copy", "transpose", "convert",
                                             "slice", "concatenate"}:
    return "layout copy / transpose"
  if ops <= {"broadcast"}:
    return "broadcast (fill)"
  if ops & {"scatter", "gather", "dynamic-slice", "dynamic-update-slice"}:
    return "gather / scatter / slicing"
  if ops & {"reduce", "reduce-window"}:
    return "reduction (+ elementwise)"
  return "elementwise"


def _phase(op_name: str) -> str:
  """The training phase an op's metadata names (`update` if neither)."""
  if "transpose(jvp(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "update"


def parse_hlo(text: str, training: bool = True) -> dict[str, Op]:
  """Every instruction of an optimized HLO module, with its grouping.

  `training`: the module differentiates a loss; its ops get a phase.
  """
  computations: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    m = _COMPUTATION.match(line.strip())
    if m and not line.startswith(" "):
      current = m.group(1)
      computations[current] = []
    elif current is not None and line.strip() and line.strip() != "}":
      computations[current].append(line)
  shapes = {}
  for lines in computations.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if m:
        shapes[m.group(1)] = m.group(2)
  # Computations run by while loops, and what each computation calls.
  loop_bodies, calls = set(), collections.defaultdict(set)
  for comp, lines in computations.items():
    for line in lines:
      for callee in re.findall(
          r"(?:body|condition|calls|to_apply|branch_computations)="
          r"\{?%?([\w.\-]+)", line):
        calls[comp].add(callee)
      if " while(" in line:
        loop_bodies.update(re.findall(r"(?:body|condition)=%?([\w.\-]+)",
                                      line))
  # Ops without metadata (a loop body's) take their caller's phase.
  caller_phase = {}
  for comp, lines in computations.items():
    for line in lines:
      meta = re.search(r'op_name="([^"]*)"', line)
      for callee in re.findall(r"(?:body|condition|calls)=%?([\w.\-]+)", line):
        if meta:
          caller_phase.setdefault(callee, _phase(meta.group(1)))
  in_loop = set()
  stack = list(loop_bodies)
  while stack:
    comp = stack.pop()
    if comp not in in_loop:
      in_loop.add(comp)
      stack.extend(calls[comp])
  ops = {}
  for comp, lines in computations.items():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, shape, opcode, rest = m.groups()
      callee = re.search(r"calls=%?([\w.\-]+)", rest)
      body = "\n".join(computations.get(callee.group(1), [])) if callee else ""
      body_with_config = body + rest
      flops, operands = 0.0, ""
      dot_line = rest if opcode == "dot" else next(
          (l for l in body.splitlines() if " dot(" in l), "")
      if dot_line:
        dm = _INSTRUCTION.match(dot_line) if dot_line is not rest else None
        if dm:
          flops, operands = _dot_flops(dm.group(4), dm.group(2), shapes)
        else:
          flops, operands = _dot_flops(rest, shape, shapes)
      meta = re.search(r'op_name="([^"]*)"', rest)
      phase = (_phase(meta.group(1)) if meta
               else caller_phase.get(comp, "update"))
      ops[name] = Op(name, opcode, shape,
                     kind_of(opcode, name, body_with_config),
                     phase if training else "",
                     comp in in_loop, flops, operands)
  return ops


def op_times(trace_dir: str, ops: dict[str, Op], calls: int
             ) -> tuple[dict[str, float], dict[str, float]]:
  """Microseconds and runs per call of each op in `ops`, from a trace.

  Loops and calls are left out (their time is their body's ops'), as are
  events of other programs (names not in `ops`).
  """
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                           recursive=True))
  if not files:
    raise SystemExit(f"error: The profiler wrote no trace under {trace_dir}.")
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  times, runs = collections.Counter(), collections.Counter()
  for e in events:
    op = ops.get(e.get("name", ""))
    if (e.get("ph") == "X" and op is not None
        and op.opcode not in ("while", "call", "conditional")):
      times[op.name] += e.get("dur", 0) / calls
      runs[op.name] += 1 / calls
  return times, runs


def profile(fn: Callable[[], Any], compiled_text: str, calls: int,
            training: bool = True) -> tuple[dict[str, Op], dict[str, float], dict[str, float],
                       float]:
  """Traces `calls` calls of `fn`.

  Returns:
    (ops, µs per call of each, runs per call of each, wall s per call).
  """
  ops = parse_hlo(compiled_text, training)
  jax.block_until_ready(fn())  # Warm-up.
  start = time.perf_counter()
  for _ in range(calls):
    jax.block_until_ready(fn())
  wall = (time.perf_counter() - start) / calls
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(calls):
      jax.block_until_ready(fn())
    jax.profiler.stop_trace()
    return ops, *op_times(trace_dir, ops, calls), wall


def report(title: str, ops: dict[str, Op], times: dict[str, float],
           runs: dict[str, float], wall: float, peak: float, top: int
           ) -> None:
  """Prints the grouped table and the slowest single ops."""
  total = sum(times.values())
  print(f"\n{title}: {wall * 1e3:.0f} ms per call untraced; ops summed "
        f"{total / 1e3:.0f} ms")
  groups = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for name, us in times.items():
    op = ops[name]
    where = (op.phase + ", " if op.phase else "") + (
        "in loop" if op.in_loop else "outside loops")
    g = groups[(where, op.kind)]
    g[0] += us
    g[1] += op.flops * runs[name]
    g[2] += 1
  print(f"  {'where':<26} {'what':<28} {'ms':>7} {'share':>6} "
        f"{'GFLOP/s':>8} {'of peak':>7}")
  for (where, kind), (us, flops, _) in sorted(
      groups.items(), key=lambda kv: -kv[1][0]):
    rate = f"{flops / us / 1e3:8.0f}" if flops else " " * 8
    share = f"{flops / us / 1e3 / peak:7.0%}" if flops else " " * 7
    print(f"  {where:<26} {kind:<28} {us / 1e3:7.1f} {us / total:6.0%} "
          f"{rate} {share}")
  by_kind = collections.Counter()
  for name, us in times.items():
    by_kind[ops[name].kind] += us
  print("  by kind: " + ", ".join(f"{k} {v / total:.0%}"
                                   for k, v in by_kind.most_common()))
  print("  slowest ops (ms per call, runs per call):")
  for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
    op = ops[name]
    extra = (f", {op.operands}, "
             f"{op.flops * runs[name] / us / 1e3:.0f} GFLOP/s"
             if op.flops else "")
    print(f"    {us / 1e3:7.2f} x{runs[name]:<3.0f} {name:<24} {op.shape:<24} "
          f"{op.kind}"
          f"{extra} ({op.phase or 'decode'}"
          f"{', loop' if op.in_loop else ''})")


def main(argv):
  del argv
  peaks = {d: benchmark.matmul_peak(2048, dtype=captioner.DTYPES[d]
                                    or jnp.float32)
           for d in ("float32", "bfloat16")}
  print(f"jax {jax.__version__}, {cpu_tuning.cpu_model()} "
        f"({os.cpu_count()} CPUs), {cpu_tuning.cpu_flags_phrase()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"matmul peak: float32 {peaks['float32']:.0f}, bfloat16 "
        f"{peaks['bfloat16']:.0f} GFLOP/s")
  sizes = benchmark.decoder_sizes()
  b, t, r = sizes["batch"], sizes["length"], sizes["regions"]
  params = benchmark.decoder_params(jax.random.key(0), sizes)
  for dtype_name in _DTYPES.value:
    dtype = captioner.DTYPES[dtype_name]
    peak = peaks[dtype_name]
    if "train" in _PARTS.value:
      optimizer = optax.adam(1e-4)
      # Fresh copies: the step donates them.
      state = [jax.tree.map(jnp.copy, params), optimizer.init(params)]
      features = jax.nn.relu(jax.random.normal(
          jax.random.key(1), (b, r, sizes["feature_dim"])))
      tokens = jnp.asarray(benchmark.random_tokens(
          np.random.RandomState(0), b, t, sizes["vocab_size"]))
      rng = jax.random.key(2)
      step = benchmark.make_train_step(optimizer, benchmark._DROPOUT.value,  # pylint: disable=protected-access
                                       benchmark._ALPHA_C.value, dtype)  # pylint: disable=protected-access
      text = step.lower(*state, features, tokens, rng).compile().as_text()

      def train(state=state, step=step, features=features, tokens=tokens,
                rng=rng):
        state[0], state[1], loss = step(*state, features, tokens, rng)
        return loss

      report(f"decoder training step, {dtype_name} (B={b}, T={t}, R={r}, "
             f"V={sizes['vocab_size']})",
             *profile(train, text, _PROFILE_STEPS.value), peak, _TOP.value)
    if "beam" in _PARTS.value:
      weights = captioner.decoding_weights(params, dtype_name)
      features = jax.nn.relu(jax.random.normal(
          jax.random.key(3), (benchmark._BEAM_BATCH.value, r,  # pylint: disable=protected-access
                              sizes["feature_dim"])))
      beam = jax.jit(benchmark.make_beam_fn(_PROFILE_BEAM.value,
                                            benchmark._BEAM_LENGTH.value))  # pylint: disable=protected-access
      text = beam.lower(weights, features).compile().as_text()
      ops, times, runs, wall = profile(lambda: beam(weights, features),
                                       text, _PROFILE_STEPS.value,
                                       training=False)
      report(f"beam {_PROFILE_BEAM.value}, {dtype_name} "
             f"({benchmark._BEAM_BATCH.value} images, "  # pylint: disable=protected-access
             f"{benchmark._BEAM_BATCH.value / wall:.0f} images/s untraced)",  # pylint: disable=protected-access
             ops, times, runs, wall, peak, _TOP.value)


def enable_tracing() -> None:
  """Adds the per-op trace flag to XLA_FLAGS; before JAX starts."""
  if not cpu_tuning.xla_defines(TRACE_FLAG):
    raise SystemExit(f"error: This jaxlib has no --{TRACE_FLAG}: XLA:CPU "
                     "cannot report per-op times; profile with a newer one.")
  if TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --{TRACE_FLAG}=true").strip()


if __name__ == "__main__":
  enable_tracing()
  cpu_tuning.set_cpu_xla_flags()
  app.run(main)
