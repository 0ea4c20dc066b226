"""What the compiled PeRFlow training step does, read on a CPU without running it: FLOPs, memory, dtypes.

The step that bench/train_step.py times (``train_step_jax.JaxStep``, XLA attention) is lowered from
abstract arguments and, with ``--compile``, compiled for the CPU. Reported: FLOPs (XLA's cost
analyses and a count of every dot and convolution, loop bodies times their trips), XLA's memory
analysis, the hot path's dtypes (dots, conversions, bfloat16 round trips, normalisation reductions,
by source line) and the CPU's fusions; bench/README.md says how each is read. A report goes to
stdout, everything to ``$OUT/inspect_step.json``.

    python3 bench/inspect_step.py                      # SD1.5 at 512 px, batch 16, lowered only
    python3 bench/inspect_step.py --compile            # also compile for the CPU (minutes)
    python3 bench/inspect_step.py --size 16 --batch 2 --compile
    python3 bench/inspect_step.py --size 16 --batch 4 --accumulation 2 --compile   # 2 microbatches of 2
    python3 bench/inspect_step.py --size 16 --batch 2 --lora-rank 64 --compile     # a LoRA student of rank 64
"""

# The imports below must follow the sys.path line before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jaxlib
from jaxlib import _hlo

from bench.common import memory_analysis, now, out_dir, write_json
from bench.train_step_jax import JaxStep, StepOptions
from bench.train_step_spec import SD15, SDXL, STUDENT_PASSES
from perflow_jax.flops import cost_flops, train_step_flops

ELEMENTWISE = set(
    "add subtract multiply divide maximum minimum negate exponential log rsqrt sqrt tanh logistic abs power select "
    "clamp erf sine cosine exponential-minus-one log-plus-one reshape bitcast transpose copy convert broadcast".split()
)
FLOATS = ("f64", "f32", "bf16", "f16")


@dataclasses.dataclass
class Instruction:
    name: str
    dtype: str  # "tuple" for tuple-shaped results
    dims: tuple[int, ...]
    op: str
    operands: list[str]
    attrs: str
    frame: int | None
    computation: str
    literal: str = ""  # a constant's value as printed

    @property
    def elements(self) -> int:
        return math.prod(self.dims)


@dataclasses.dataclass
class HloModule:
    """An HLO module's instructions by computation, who calls whom, and the source frames."""

    computations: dict[str, list[Instruction]]
    entry: str
    frames: dict[int, tuple[str, str, int, int | None]]  # id -> (file, function, line, parent id)

    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for instructions in self.computations.values() for i in instructions}


def hlo_text(module) -> str:
    """An HloModule (``compiler_ir("hlo").as_hlo_module()`` or a compiled module) printed with metadata."""
    options = _hlo.HloPrintOptions()
    options.print_metadata = True
    options.print_large_constants = False
    options.print_operand_shape = False
    return module.to_string(options)


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at ``start``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth, opening = 0, text[start]
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == pairs[opening]:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opening!r} in HLO text: {text[start : start + 80]!r}")


_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")


def parse_hlo(text: str) -> HloModule:
    """Parse HLO text (as ``hlo_text`` prints it): instructions, calls and the stack-frame tables."""
    computations, entry, current = {}, None, None
    tables = collections.defaultdict(dict)
    table = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = stripped
            continue
        header = _HEADER.match(stripped)
        if header:
            table, current = None, header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if table and stripped:
            key, _, value = stripped.partition(" ")
            tables[table][int(key)] = value
            continue
        if current is None or " = " not in stripped or not stripped.removeprefix("ROOT ").startswith("%"):
            continue
        name, _, rest = stripped.removeprefix("ROOT ").partition(" = ")
        if rest.startswith("("):
            end = _closing(rest, 0)
            dtype, dims, rest = "tuple", (), rest[end + 2 :]
        else:
            shape, _, rest = rest.partition(" ")
            match = _SHAPE.match(shape)
            dtype = match.group(1) if match else shape
            dims = tuple(int(d) for d in match.group(2).split(",") if d) if match else ()
        op, paren, rest = rest.partition("(")
        end = _closing("(" + rest, 0) - 1
        operands = [o.strip() for o in rest[:end].split(",") if o.strip().startswith("%")]
        attrs = rest[end + 1 :]
        frame = re.search(r"stack_frame_id=(\d+)", attrs)
        instruction = Instruction(
            name=name.lstrip("%"),
            dtype=dtype,
            dims=dims,
            op=op,
            operands=[o.lstrip("%") for o in operands],
            attrs=attrs,
            frame=int(frame.group(1)) if frame else None,
            computation=current,
            literal=rest[:end] if op == "constant" else "",
        )
        computations[current].append(instruction)
    return HloModule(computations, entry, _frames(tables))


def _frames(tables) -> dict[int, tuple[str, str, int, int | None]]:
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    locations = {}
    for key, value in tables["FileLocations"].items():
        fields = dict(re.findall(r"(\w+)=(\d+)", value))
        file = files.get(int(fields["file_name_id"]), "?")
        locations[key] = (file, functions.get(int(fields["function_name_id"]), "?"), int(fields["line"]))
    parents = {k: int(dict(re.findall(r"(\w+)=(\d+)", v))["parent_frame_id"]) for k, v in tables["StackFrames"].items()}
    # XLA prints a frame's parent id plus one (0: none); a root then shows its own id, which a real
    # parent never is. Without such a frame the ids are taken as printed.
    shifted = any(parent == key for key, parent in parents.items())
    frames = {}
    for key, value in tables["StackFrames"].items():
        location = locations[int(dict(re.findall(r"(\w+)=(\d+)", value))["file_location_id"])]
        parent = parents[key] - 1 if shifted else parents[key]
        frames[key] = (*location, parent if parent > 0 and parent != key else None)
    return frames


def source(module: HloModule, frame: int | None) -> str:
    """'file:line function' of the innermost frame, and '<- file:line function' of the first one in perflow_jax
    when that is another frame."""
    if frame is None or frame not in module.frames:
        return "(no source)"
    chain, seen = [], set()
    while frame is not None and frame not in seen and frame in module.frames:
        seen.add(frame)
        file, function, line, parent = module.frames[frame]
        chain.append(f"{_short(file)}:{line} {function}")
        frame = parent
    ours = next((c for c in chain if c.startswith("perflow_jax/")), None)
    return chain[0] if ours in (None, chain[0]) else f"{chain[0]} <- {ours}"


def _short(file: str) -> str:
    for marker in ("perflow_jax/", "bench/", "site-packages/"):
        if marker in file:
            return file[file.index(marker) :].removeprefix("site-packages/")
    return file


_CALLED = re.compile(r"(calls|body|true_computation|false_computation|to_apply)=(%[\w.\-]+)")


def trip_count(module: HloModule, loop: Instruction) -> int:
    """Iterations of a while loop: XLA's known_trip_count where it has put one (optimised HLO), else read
    from the condition as jax writes loops (counter from 0, ``counter < constant``)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", loop.attrs).group(1)
    instructions = {i.name: i for i in module.computations[condition]}
    for instr in instructions.values():
        if instr.op == "compare" and "direction=LT" in instr.attrs:
            bound = instructions.get(instr.operands[1])
            if bound is not None and bound.op == "constant" and bound.literal.lstrip("-").isdigit():
                return int(bound.literal)
    raise ValueError(f"cannot read the trip count of {loop.name} from its condition {condition}")


def multiplicities(module: HloModule) -> dict[str, int]:
    """How often each computation runs per call of the entry: call sites times while-loop trips.

    A while body counts its loop's trips (the teacher's S solver steps; the microbatches of gradient
    accumulation); reducers (``to_apply`` of reduce, sort, scatter) and loop conditions are not counted.
    """
    callers = collections.defaultdict(list)  # callee -> [(caller, factor)]
    for name, instructions in module.computations.items():
        for instr in instructions:
            for key, callee in re.findall(_CALLED, instr.attrs):
                if key != "to_apply" or instr.op == "call":  # to_apply of reduce, sort, scatter: a scalar reducer
                    factor = trip_count(module, instr) if key == "body" else 1
                    callers[callee.lstrip("%")].append((name, factor))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", instr.attrs):
                for callee in group.split(","):
                    callers[callee.strip().lstrip("%")].append((name, 1))
    memo = {module.entry: 1}

    def count(name, stack=()):
        if name not in memo:
            memo[name] = sum(count(caller, stack + (name,)) * f for caller, f in callers[name] if caller not in stack)
        return memo[name]

    return {name: count(name) for name in module.computations}


def matmul_flops(instr: Instruction, shapes: dict[str, Instruction]) -> float:
    """2 x output elements x contraction size of a dot or convolution."""
    if instr.op == "dot":
        lhs = shapes[instr.operands[0]].dims
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
        size = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
        return 2.0 * instr.elements * size
    rhs = shapes[instr.operands[1]].dims
    labels = re.search(r"dim_labels=\w+_(\w+)->", instr.attrs)
    out_features = rhs[labels.group(1).index("o")] if labels else 1
    groups = re.search(r"batch_group_count=(\d+)", instr.attrs)
    return 2.0 * instr.elements * math.prod(rhs) / out_features / (int(groups.group(1)) if groups else 1)


def precision_report(module: HloModule) -> dict:
    """Dots and convolutions by dtypes; conversions by direction and source; float32 round trips; reductions."""
    factor = multiplicities(module)
    shapes = module.by_name()
    matmuls = collections.defaultdict(lambda: {"count": 0, "flops": 0.0, "sources": collections.Counter()})
    converts = collections.defaultdict(lambda: {"count": 0, "elements": 0, "sources": collections.Counter()})
    round_trips = collections.Counter()
    reductions = collections.defaultdict(lambda: {"count": 0, "elements": 0})
    for name, instructions in module.computations.items():
        n = factor.get(name, 0)
        if not n:
            continue
        for instr in instructions:
            if instr.op in ("dot", "convolution"):
                operands = "x".join(shapes[o].dtype for o in instr.operands[:2])
                row = matmuls[f"{instr.op} {operands} -> {instr.dtype}"]
                row["count"] += n
                flops = n * matmul_flops(instr, shapes)
                row["flops"] += flops
                row["sources"][source(module, instr.frame)] += flops
            elif instr.op == "convert" and instr.dtype in FLOATS:
                origin = shapes[instr.operands[0]].dtype
                if origin not in FLOATS or origin == instr.dtype:
                    continue
                row = converts[f"{origin} -> {instr.dtype}"]
                row["count"] += n
                row["elements"] += n * instr.elements
                row["sources"][source(module, instr.frame)] += n * instr.elements
                if origin == "f32" and instr.dtype in ("bf16", "f16"):
                    start = _round_trip_start(instr, shapes)
                    if start is not None:
                        key = f"{source(module, start.frame)}  =>  {source(module, instr.frame)}"
                        round_trips[key] += n * instr.elements
            elif instr.op == "reduce" and instr.dtype in FLOATS:
                operand = shapes[instr.operands[0]]
                row = reductions[f"{source(module, instr.frame)} ({operand.dtype} -> {instr.dtype})"]
                row["count"] += n
                row["elements"] += n * operand.elements

    def top(counter, k=12):
        return [[key, value] for key, value in counter.most_common(k)]

    return {
        "matmuls": {k: {**v, "sources": top(v["sources"])} for k, v in matmuls.items()},
        "converts": {k: {**v, "sources": top(v["sources"])} for k, v in converts.items()},
        "round_trips": top(round_trips, 20),
        "round_trip_elements": sum(round_trips.values()),
        "reductions": dict(sorted(reductions.items(), key=lambda kv: -kv[1]["elements"])),
    }


def _round_trip_start(instr: Instruction, shapes: dict[str, Instruction], depth: int = 12) -> Instruction | None:
    """The bfloat16/float16 -> float32 conversion that a float32 -> bfloat16 conversion's operand chain of
    element-wise ops starts from, if any (breadth-first over operands, ``depth`` ops deep)."""
    frontier, seen = [instr.operands[0]], set()
    for _ in range(depth):
        next_frontier = []
        for name in frontier:
            if name in seen or name not in shapes:
                continue
            seen.add(name)
            node = shapes[name]
            if node.op == "convert" and node.dtype == "f32" and shapes[node.operands[0]].dtype in ("bf16", "f16"):
                return node
            if node.op in ELEMENTWISE and node.dtype == "f32":
                next_frontier.extend(node.operands)
        frontier = next_frontier
    return None


def fusion_report(module: HloModule) -> dict:
    """After optimisation: kernels (fusions and other top-level ops), fusions holding reductions by source,
    and conversions left outside fusions (each one a materialised copy in another dtype)."""
    factor = multiplicities(module)
    fused = {
        i.attrs.split("calls=%")[1].split(",")[0].split("}")[0]
        for instrs in module.computations.values()
        for i in instrs
        if i.op == "fusion"
    }
    top_level = [c for c in module.computations if c not in fused and factor.get(c)]
    kernels = collections.Counter()
    unfused_converts = collections.Counter()
    reduction_fusions = collections.Counter()
    shapes = module.by_name()
    for name in top_level:
        for instr in module.computations[name]:
            if instr.op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
                continue
            kernels[instr.op] += factor[name]
            if instr.op == "convert" and instr.operands and shapes[instr.operands[0]].dtype != instr.dtype:
                key = f"{shapes[instr.operands[0]].dtype} -> {instr.dtype}: {source(module, instr.frame)}"
                unfused_converts[key] += factor[name] * instr.elements
            if instr.op == "fusion":
                callee = instr.attrs.split("calls=%")[1].split(",")[0].split("}")[0]
                reduces = [i for i in module.computations.get(callee, []) if i.op == "reduce"]
                if reduces:
                    reduction_fusions[source(module, reduces[0].frame)] += factor[name]
    return {
        "kernels": dict(kernels.most_common()),
        "unfused_converts": [[k, v] for k, v in unfused_converts.most_common(15)],
        "reduction_fusions": [[k, v] for k, v in reduction_fusions.most_common(20)],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--size", type=int, help="latent height and width (default: the model's, 64 or 128)")
    parser.add_argument("--batch", type=int, default=16, help="batch of the step (default 16)")
    parser.add_argument("--remat", default="none", choices=("none", "dots", "full"), help="student rematerialisation")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps (default 1)")
    parser.add_argument("--lora-rank", type=int, default=0, help="a LoRA student of this rank (default 0: full)")
    parser.add_argument("--compile", action="store_true", help="also compile for the CPU: memory, fusion (minutes)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = {"sd15": SD15, "sdxl": SDXL}[args.model]
    full_size = spec.latent_size
    spec = dataclasses.replace(spec, latent_size=args.size or full_size)
    results = {
        "benchmark": "inspect_step",
        "date": now(),
        "command": shlex.join(["python3", "bench/inspect_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version()},
        "model": spec.name,
        "latent_size": spec.latent_size,
        "batch": args.batch,
        "remat": args.remat,
        "accumulation": args.accumulation,
        "lora_rank": args.lora_rank,
        "settings": spec.settings,
    }
    print(
        f"{spec.name} step at {spec.latent_size}x{spec.latent_size} latents, batch {args.batch}, remat {args.remat}, "
        f"{args.accumulation} microbatch(es)"
    )
    bench = JaxStep(
        spec, StepOptions(attention="xla", remat=args.remat, accumulation=args.accumulation, lora_rank=args.lora_rank)
    )
    start = time.perf_counter()
    lowered = bench.lower("step", args.batch)
    results["lower_s"] = time.perf_counter() - start
    forward = bench.unet_forward_flops()
    lowered_flops = cost_flops(lowered)
    passes = spec.teacher_passes + STUDENT_PASSES
    text = hlo_text(lowered.compiler_ir("hlo").as_hlo_module())
    module = parse_hlo(text)
    precision = precision_report(module)
    counted = sum(row["flops"] for row in precision["matmuls"].values())
    analytic = passes * spec.flops_per_forward if spec.latent_size == full_size else None
    step_flops = train_step_flops(
        lowered,
        bench.components,
        bench.settings,
        bench.state_abstract.params,
        bench.frozen_abstract,
        bench.batch_abstract(args.batch),
        args.accumulation,
    )
    results["flops_per_sample"] = {
        "analytic": analytic,
        "passes_x_lowered_unet_forward": passes * forward,
        "lowered_step_cost_analysis": lowered_flops / args.batch,
        "lowered_step_plus_loops": step_flops / args.batch,
        "dots_and_convolutions_counted_here": counted / args.batch,
    }
    results["precision"] = precision
    print(f"lowered in {results['lower_s']:.1f} s; {len(text) / 1e6:.1f} MB of HLO text")
    if args.compile:
        start = time.perf_counter()
        compiled = lowered.compile()
        results["compile_s"] = time.perf_counter() - start
        results["memory_analysis"] = memory_analysis(compiled)
        results["flops_per_sample"]["compiled_step_cost_analysis"] = cost_flops(compiled) / args.batch
        optimized = parse_hlo(hlo_text(compiled.runtime_executable().hlo_modules()[0]))
        results["fusion"] = fusion_report(optimized)
        print(f"compiled for the CPU in {results['compile_s']:.1f} s")
    print_report(results)
    path = out_dir() / "inspect_step.json"
    write_json(path, results)
    print(f"\nresults: {path}")
    return 0


def print_report(results: dict) -> None:
    def g(x):
        return f"{x / 1e9:,.1f}" if x else "-"

    print("\nFLOPs per sample (GFLOP):")
    for key, value in results["flops_per_sample"].items():
        print(f"  {key:40s} {g(value)}")
    memory = results.get("memory_analysis")
    if memory:
        print("\nXLA memory analysis (CPU buffer assignment), GB:")
        print("  " + ", ".join(f"{k.removesuffix('_bytes')} {v / 1e9:.2f}" for k, v in memory.items()))
    precision = results["precision"]
    print("\nDots and convolutions by operand and result dtypes (per step):")
    for key, row in sorted(precision["matmuls"].items(), key=lambda kv: -kv[1]["flops"]):
        print(f"  {key:45s} {row['count']:6d} ops {row['flops'] / 1e12:10.2f} TFLOP")
        if not key.endswith("bf16x bf16 -> bf16") and "f32" in key:
            for where, flops in row["sources"][:6]:
                print(f"      {flops / 1e12:8.3f} TFLOP  {where}")
    print("\nDtype conversions (elements per step):")
    for key, row in sorted(precision["converts"].items(), key=lambda kv: -kv[1]["elements"]):
        print(f"  {key:14s} {row['count']:6d} ops {row['elements'] / 1e9:10.2f} G elements; largest sources:")
        for where, elements in row["sources"][:8]:
            print(f"      {elements / 1e9:8.2f} G  {where}")
    elements = precision["round_trip_elements"] / 1e9
    print(f"\nbfloat16 -> float32 -> bfloat16 round trips: {elements:.2f} G elements per step")
    for where, elements in precision["round_trips"][:12]:
        print(f"  {elements / 1e9:8.2f} G  {where}")
    print("\nReductions (normalisation statistics and others), elements read per step:")
    for key, row in list(precision["reductions"].items())[:12]:
        print(f"  {row['elements'] / 1e9:8.2f} G in {row['count']:5d} reductions  {key}")
    fusion = results.get("fusion")
    if fusion:
        kernels = fusion["kernels"]
        largest = ", ".join(f"{k} {v}" for k, v in list(kernels.items())[:8])
        print(f"\nAfter CPU optimisation: {sum(kernels.values())} top-level ops per step: {largest}")
        print("  fusions holding a reduction, by source of their first reduction:")
        for where, count in fusion["reduction_fusions"][:12]:
            print(f"    {count:5d}  {where}")
        print("  conversions outside fusions (materialised), elements per step:")
        for where, elements in fusion["unfused_converts"][:10]:
            print(f"    {elements / 1e9:8.2f} G  {where}")


if __name__ == "__main__":
    sys.exit(main())
