"""Build and export a CPU model's kernels on every core.

``tvm.compile`` builds all of a model's PrimFuncs as one LLVM module, and
``export_library`` writes that module to one object file: both on one core. For
DenseNet-121 (321 kernels) the two took 47 of its 74 s of compile time on a 2-core Zen 3.
Here the kernels are split into one LLVM module per usable core, built in threads and
written to objects in threads (TVM's builds and LLVM's object emission release the GIL,
and each LLVM module has its own context), and the linker joins the objects into the same
one shared library ``export_library`` would write. The Relax side is
``tvm.relax.build``'s own steps (VM codegen, ``_vmlink``), with the kernels given to the
link as built libraries instead of one module to build.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from graphopt.targets import _runner

# Below this many kernels a split saves less than the extra modules cost.
_MIN_KERNELS_PER_PART = 16


def workers() -> int:
    """How many threads build and write: the CPUs this process may run on."""
    return _runner.usable_cpus()


def split(tir_mod, parts: int) -> list:  # noqa: ANN001 - tvm.IRModule
    """``tir_mod``'s PrimFuncs in ``parts`` modules, dealt round-robin by name (similar
    kernels have similar names, so each part gets a share of every kind)."""
    import tvm

    gvars = sorted(tir_mod.get_global_vars(), key=lambda g: g.name_hint)
    parts = max(1, min(parts, len(gvars) // _MIN_KERNELS_PER_PART))
    return [
        tvm.IRModule({g: tir_mod[g] for g in gvars[i::parts]}, attrs=tir_mod.attrs)
        for i in range(parts)
    ]


def build(mod, target, relax_pipeline):  # noqa: ANN001, ANN201 - tvm objects
    """``tvm.compile(mod, target, relax_pipeline=relax_pipeline)`` for an LLVM target,
    with the kernels built in :func:`workers` threads. Returns the VM executable."""
    import tvm
    from tvm import relax
    from tvm.relax import vm_build

    mod = relax_pipeline(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    ext_libs = list(attrs.get("external_mods", []))
    params = dict(attrs.get("const_name_to_constant", {}))
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    tir_mod = vm_build._filter_tir(mod)
    if tir_mod is None or len(tir_mod.get_global_vars()) == 0:
        return vm_build._vmlink(builder, target, None, ext_libs=ext_libs, params=params)
    tir_mod = vm_build._auto_attach_system_lib_prefix(tir_mod, target, None)
    parts = split(tir_mod, workers())
    context = tvm.transform.PassContext.current()  # thread-local: the workers enter it

    def build_part(part):  # noqa: ANN001, ANN202
        with context:
            return tvm.tirx.build(part, target=target)

    with ThreadPoolExecutor(len(parts)) as pool:
        libs = list(pool.map(build_part, parts))
    # _vmlink's own steps with a built library: the first part imports the others, as a
    # host module imports device modules; every kernel is found by name through it.
    for lib in libs[1:]:
        libs[0].import_module(lib)
    return vm_build.VMExecutable(
        vm_build._ffi_api.VMLink(builder, target, libs[0], ext_libs, params)
    )


def export(executable, path: Path, fcompile=None) -> None:  # noqa: ANN001
    """``executable.export_library(path, fcompile=fcompile)``, with each LLVM module's
    object written in its own thread. A tree with any other kind of module (C source, a
    device module) goes to ``export_library`` as it is."""
    from tvm.runtime import _ffi_api
    from tvm.support import cc, utils

    root = executable.mod
    modules = root._collect_dso_modules()
    if len(modules) < 2 or any(m.kind != "llvm" for m in modules):
        kwargs = {"fcompile": fcompile} if fcompile is not None else {}
        executable.export_library(str(path), **kwargs)
        return
    temp = utils.tempdir()
    files = [temp.relpath(f"lib{i}.o") for i in range(len(modules))]
    with ThreadPoolExecutor(min(workers(), len(modules))) as pool:
        list(pool.map(lambda mf: mf[0].write_to_file(mf[1]), zip(modules, files, strict=True)))
    first = modules[0]
    system_lib = first.get_function("__tvm_is_system_module")()
    prefix = first.get_function("__tvm_get_system_lib_prefix")() or ""
    if root.imports:
        devc = temp.relpath(f"{prefix}devc.o")
        target = first.get_function("_get_target_string")()
        _ffi_api.ModulePackImportsToLLVM(root, system_lib, target, prefix).write_to_file(devc)
        files.append(devc)
    (fcompile or cc.create_shared)(str(path), files)
