"""tome-compile from Python: Token Merging for ONNX Vision Transformers.

    import onnx, tome_compile
    compiled, report = tome_compile.compile(onnx.load("vit.onnx"), r=16)

Every function runs the same code as the ``tome-compile`` command with the
same flags (keyword arguments are the flags, ``prop_attn=False`` is
``--prop-attn off``), so the bytes are the same. A failure raises
``TomeCompileError`` with the ``kind``, ``message`` and ``exit_code`` that
``--json`` reports.
"""

import json
import os
import tempfile

from . import _native


__all__ = ["compile", "inspect", "tune", "sweep", "onnxruntime_ops", "TomeCompileError", "main"]


def _flags(**kwargs):
    """Keyword arguments as command-line flags (None and False are left out)."""
    argv = []
    for key, value in kwargs.items():
        if value is None or (value is False and key != "prop_attn"):
            continue
        flag = "--" + key.replace("_", "-")
        if key == "prop_attn":
            argv += [flag, "on" if value else "off"]
        elif value is True:
            argv.append(flag)
        elif key == "schedules":
            for s in value:
                argv += ["--schedule", str(s)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


class TomeCompileError(Exception):
    """A failed command: `kind` (usage, invalid_model, unsupported_model, io,
    verification_failed, internal), `message` and `exit_code`, as the
    command's ``--json`` error reports them."""

    def __init__(self, kind, message, exit_code):
        super().__init__(message)
        self.kind, self.message, self.exit_code = kind, message, exit_code


def _run(argv):
    try:
        return json.loads(_native.execute(["tome-compile", *argv, "--json"]))
    except _native.TomeCompileError as e:
        raise TomeCompileError(*e.args) from None


class _Model:
    """A model given as an onnx.ModelProto, bytes or a path, seen as a file."""

    def __init__(self, model):
        self.kind = None
        self._tmp = None
        if isinstance(model, (str, os.PathLike)):
            self.kind, self.path = "path", os.fspath(model)
            return
        if isinstance(model, (bytes, bytearray, memoryview)):
            self.kind, data = "bytes", bytes(model)
        elif hasattr(model, "SerializeToString"):
            self.kind, data = "proto", model.SerializeToString()
        else:
            raise TypeError(f"model must be an onnx.ModelProto, bytes or a path, not {type(model).__name__}")
        self._tmp = tempfile.TemporaryDirectory(prefix="tome_compile_")
        self.path = os.path.join(self._tmp.name, "model.onnx")
        with open(self.path, "wb") as f:
            f.write(data)

    def output(self, output):
        """Where the compiled model goes: `output` for a path, else a temporary file."""
        if self.kind == "path":
            if output is None:
                raise TypeError("compiling a model given as a path needs output= (the path to write)")
            return os.fspath(output)
        if output is not None:
            raise TypeError("output= is for models given as a path; this one is returned")
        return os.path.join(self._tmp.name, "compiled.onnx")

    def result(self, path, given_output):
        """The compiled model in the kind the input was given in."""
        if self.kind == "path":
            return given_output
        if self.kind == "bytes":
            with open(path, "rb") as f:
                return f.read()
        import onnx  # a ModelProto came in, so onnx is installed

        return onnx.load(path)

    def close(self):
        if self._tmp is not None:
            self._tmp.cleanup()


def compile(model, r=16, prop_attn=True, target="portable", *, output=None, tokens=None, unmerge=False,
            image_size=None, verify="auto", format=None):
    """Compiles `model` with the schedule `r` (an int, or a string such as
    "16,16,8" or "8:-1"). Returns (compiled, report): compiled of the kind
    given (ModelProto, bytes, or the output path), report as a dict (what
    ``tome-compile compile --json`` prints)."""
    m = _Model(model)
    try:
        out = m.output(output)
        report = _run(["compile", m.path, "--r", str(r), "-o", out,
                       *_flags(prop_attn=prop_attn, target=target, tokens=tokens, unmerge=unmerge,
                               image_size=image_size, verify=verify, format=format)])
        if m.kind != "path":
            report["output"] = None
        return m.result(out, output), report
    finally:
        m.close()


def onnxruntime_ops():
    """The path of onnxruntime's custom-op library for graphs compiled with
    ``target="onnxruntime-ops"``: this package's native module, which holds
    libtome_ort_ops's entry point.

        so = onnxruntime.SessionOptions()
        so.register_custom_ops_library(tome_compile.onnxruntime_ops())
    """
    return _native.__file__


def inspect(model, r=0, prop_attn=True, target="portable", *, tokens=None, unmerge=False, image_size=None):
    """What the compiler finds in `model` and what schedule `r` would do, as a
    dict (``tome-compile inspect --json``); nothing is written."""
    m = _Model(model)
    try:
        return _run(["inspect", m.path, "--r", str(r),
                     *_flags(prop_attn=prop_attn, target=target, tokens=tokens, unmerge=unmerge, image_size=image_size)])
    finally:
        m.close()


def _sweep_flags(images, labels, metric, schedules, prop_attn, mean, std, batch, threads, iters,
                 skip_bad_images, tokens, image_size, target):
    return ["--images", os.fspath(images),
            *_flags(labels=os.fspath(labels) if labels is not None else None, metric=metric, schedules=schedules,
                    prop_attn=prop_attn, mean=mean, std=std, batch=batch, threads=threads, iters=iters,
                    skip_bad_images=skip_bad_images, tokens=tokens, image_size=image_size, target=target)]


def sweep(model, images, *, labels=None, metric=None, schedules=None, prop_attn=True, mean=None, std=None,
          batch=1, threads=None, iters=12, skip_bad_images=False, tokens=None, image_size=None, target="portable"):
    """Measures candidate schedules on the images in folder `images`: speed
    and metric drop of each, as a dict (``tome-compile sweep --json``)."""
    m = _Model(model)
    try:
        return _run(["sweep", m.path, *_sweep_flags(images, labels, metric, schedules, prop_attn, mean, std, batch,
                                                      threads, iters, skip_bad_images, tokens, image_size, target)])
    finally:
        m.close()


def tune(model, images, max_drop=1.0, *, output=None, labels=None, metric=None, schedules=None, prop_attn=True,
         mean=None, std=None, batch=1, threads=None, iters=12, skip_bad_images=False, tokens=None, image_size=None,
         target="portable"):
    """The fastest schedule whose metric drop on the images in `images` is at
    most `max_drop` points, compiled. Returns (compiled, report) like
    `compile`; for a path, the report and plot are written beside `output`
    (OUT.tune.json, OUT.tune.png), otherwise the plot's PNG bytes are in
    report["plot_png"]."""
    m = _Model(model)
    try:
        out = m.output(output)
        report = _run(["tune", m.path, "--max-drop", str(max_drop), "-o", out,
                       *_sweep_flags(images, labels, metric, schedules, prop_attn, mean, std, batch, threads, iters,
                                     skip_bad_images, tokens, image_size, target)])
        if m.kind != "path":
            with open(report["plot"], "rb") as f:
                report["plot_png"] = f.read()
            report["output"] = report["report"] = report["plot"] = None
        return m.result(out, output), report
    finally:
        m.close()


def main(argv=None):
    """The ``tome-compile`` command (the wheel's console script)."""
    import sys

    return _native.main(["tome-compile", *(sys.argv[1:] if argv is None else argv)])


def _console():
    import sys

    sys.exit(main())
