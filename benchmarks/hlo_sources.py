"""What a compiled program's kernels are, read from its HLO text (`jax.jit(f).lower(...).compile().as_text()`,
after XLA's optimisations): `instructions` names each with the source lines of the ops it computes (the HLO's
stack-frame tables), so a kernel named `loop_multiply_fusion_3` in a trace reads as "multiply, add at
mesanet_jax/layers/mlp.py:31 (__call__)"; `launches_per_step` counts the kernels of a compiled scan's step.

XLA names a GPU kernel after its instruction with '.' and '-' made '_' (`fusion.343` → `fusion_343`); a library
kernel (cuBLAS) is found through the trace event's `hlo_op` argument where the profiler records it.
"""
import collections
import os
import re

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(\d+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\(")
_ATTRIBUTES = {"calls": re.compile(r"calls=%?([\w.\-]+)"), "kind": re.compile(r"kind=(k\w+)"),
               "op_name": re.compile(r'op_name="([^"]*)"'), "frame": re.compile(r"stack_frame_id=(\d+)")}
_CALLEE = {"call": re.compile(r"to_apply=%?([\w.\-]+)"), "while": re.compile(r"body=%?([\w.\-]+)")}
_NOT_COMPUTED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
# Instructions that launch no kernel of their own (a call's or a loop's computation does)
_NOT_KERNELS = _NOT_COMPUTED | {"call", "while", "conditional", "after-all", "opt-barrier", "partition-id",
                                "replica-id", "add-dependency"}


def kernel_name(instruction: str) -> str:
  """The GPU kernel name XLA gives an instruction's code."""
  return re.sub(r"[.\-]", "_", instruction)


def _tables(text: str) -> dict:
  """{table: {id: row}} of the HLO text's FileNames, FunctionNames, FileLocations and StackFrames."""
  tables, current = collections.defaultdict(dict), None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = line
    elif current and (row := _TABLE_ROW.match(line)):
      value = row.group(2)
      tables[current][int(row.group(1))] = (value.strip('"') if value.startswith('"')
                                            else {k: int(v) for k, v in _FIELD.findall(value)})
    elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
      current = None
  return tables


def _source(tables: dict, frame_id: int) -> str:
  """'path:line (function)' of a stack frame's own location ('' where the tables lack it); paths from the
  repository's root (or site-packages) where the file is there."""
  location = tables["FileLocations"].get(tables["StackFrames"].get(frame_id, {}).get("file_location_id"))
  if not location:
    return ""
  path = tables["FileNames"].get(location["file_name_id"], "?")
  for root in (_REPOSITORY + os.sep, "site-packages" + os.sep):
    path = path.split(root, 1)[-1]
  function = tables["FunctionNames"].get(location["function_name_id"], "?")
  return f"{path}:{location['line']} ({function})"


def computations(text: str) -> dict[str, list[tuple[str, str, str, str]]]:
  """{computation: [(instruction, shape, opcode, line), ...] in order} of the HLO text."""
  found, current = {}, None
  for line in text.splitlines():
    if header := _COMPUTATION.match(line):
      current = found.setdefault(header.group(1), [])
    elif current is not None and (match := _INSTRUCTION.match(line)):
      current.append((*match.groups(), line))
  return found


def instructions(text: str) -> dict:
  """{kernel name: {"instruction", "opcode", "kind", "shape", "sources"}} of every computing instruction in the
  HLO text; "sources" lists "op at path:line (function)" of what it computes (a fusion: its fused ops, most
  frequent first; op is the last part of JAX's op_name)."""
  tables = _tables(text)
  computed, found = collections.defaultdict(list), []
  for computation, entries in computations(text).items():
    for name, shape, opcode, line in entries:
      if opcode in _NOT_COMPUTED:
        continue
      attributes = {key: (m.group(1) if (m := pattern.search(line)) else "") for key, pattern in _ATTRIBUTES.items()}
      where = _source(tables, int(attributes["frame"])) if attributes["frame"] else ""
      op = attributes["op_name"].rsplit("/", 1)[-1] or opcode
      own = f"{op} at {where}" if where else op
      computed[computation].append(own)
      found.append((name, opcode, attributes["kind"], shape, attributes["calls"] if opcode == "fusion" else "", own))
  most_frequent_first = lambda ops: [op for op, _ in collections.Counter(ops).most_common()]
  return {kernel_name(name): {"instruction": name, "opcode": opcode, "kind": kind, "shape": shape,
                              "sources": most_frequent_first(computed.get(calls) or [own])}
          for name, opcode, kind, shape, calls, own in found}


def launches_per_step(text: str) -> str:
  """Kernels per step of a compiled scan (a decode loop): the instructions of its loop body that run as kernels
  (descending into calls, e.g. command buffers), and the while loops nested in it (each a device round trip per
  iteration)."""
  program = computations(text)

  def count(computation: str) -> tuple[int, int]:
    kernels, loops = 0, 0
    for _, _, opcode, line in program.get(computation, []):
      if opcode == "call":
        inner = count(_CALLEE["call"].search(line).group(1))
        kernels, loops = kernels + inner[0], loops + inner[1]
      elif opcode == "while":
        loops += 1
      elif opcode not in _NOT_KERNELS:
        kernels += 1
    return kernels, loops

  bodies = [_CALLEE["while"].search(line).group(1) for entries in program.values() for _, _, opcode, line in entries
            if opcode == "while"]
  if not bodies:
    return "no loop (the scan was unrolled)"
  kernels, loops = max(count(body) for body in bodies)  # the scan: the outermost, largest body
  return f"{kernels} kernels + {loops} nested while loops"


def describe(kernel: str, hlo_ops: tuple, table: dict, limit: int = 3) -> str:
  """One line for a trace's kernel: its instruction's opcode, kind and shape and where its ops come from; the
  instruction is the kernel's namesake or, for a library kernel, the trace's `hlo_op` arguments."""
  entries = [table[k] for k in [kernel] + [kernel_name(op) for op in hlo_ops] if k in table]
  if not entries:
    return ""
  entry = entries[0]
  sources = "; ".join(entry["sources"][:limit]) + (" ..." if len(entry["sources"]) > limit else "")
  return f"{entry['instruction']} {entry['opcode']} {entry['kind']} {entry['shape']}: {sources}".replace("  ", " ")
