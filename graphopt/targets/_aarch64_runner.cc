// graphopt's runner for artifacts on a machine without Python: loads the artifact with
// the TVM runtime alone, runs `main`, writes the outputs. graphopt cross-builds it for
// aarch64 and runs it under qemu-user to check ARM artifacts on an x86 host; it builds
// natively on the device too (see README, "ARM").
//
// usage: runner ARTIFACT SPEC OUTDIR REPEAT
//   SPEC: one line per input: "<dl code> <bits> <ndim> <d0> ... <path of raw bytes>"
//   writes OUTDIR/out<i>.bin (raw bytes) and OUTDIR/out<i>.txt ("<dl code> <bits> <dims...>");
//   with REPEAT > 0, prints one "time_ms <t>" line per timed run after one warm-up run.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t size = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (size + 63) / 64 * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static std::vector<char> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: runner ARTIFACT SPEC OUTDIR REPEAT\n";
    return 2;
  }
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    // Device type 1 (CPU), device 0, allocator 2 (pooled), as tvm.runtime.vm does.
    vm->GetFunction("vm_initialization").value()(1, 0, 2);
    ffi::Function main_fn = vm->GetFunction("main").value();

    std::vector<ffi::Tensor> inputs;
    std::ifstream spec(argv[2]);
    std::string line;
    while (std::getline(spec, line)) {
      if (line.empty()) continue;
      std::istringstream in(line);
      int code, bits, ndim;
      in >> code >> bits >> ndim;
      std::vector<int64_t> shape(ndim);
      for (auto& d : shape) in >> d;
      std::string path;
      in >> path;
      DLDataType dtype{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
      ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), dtype,
                                               DLDevice{kDLCPU, 0});
      std::vector<char> bytes = ReadFile(path);
      if (bytes.size() != ffi::GetDataSize(t)) {
        throw std::runtime_error("input size mismatch for " + path);
      }
      std::copy(bytes.begin(), bytes.end(), static_cast<char*>(t.data_ptr()));
      inputs.push_back(t);
    }
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    auto call = [&]() {
      ffi::Any ret;
      main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &ret);
      return ret;
    };
    ffi::Array<ffi::Any> outs = call().cast<ffi::Array<ffi::Any>>();
    for (size_t i = 0; i < outs.size(); ++i) {
      ffi::Tensor t = outs[i].cast<ffi::Tensor>();
      std::string base = std::string(argv[3]) + "/out" + std::to_string(i);
      std::ofstream bin(base + ".bin", std::ios::binary);
      bin.write(static_cast<const char*>(t.data_ptr()), ffi::GetDataSize(t));
      std::ofstream txt(base + ".txt");
      txt << int(t.dtype().code) << " " << int(t.dtype().bits);
      for (int64_t d : t.shape()) txt << " " << d;
      txt << "\n";
    }
    int repeat = std::atoi(argv[4]);
    for (int i = 0; i < repeat; ++i) {
      auto start = std::chrono::steady_clock::now();
      call();
      std::chrono::duration<double, std::milli> ms = std::chrono::steady_clock::now() - start;
      std::printf("time_ms %.6f\n", ms.count());
    }
  } catch (const std::exception& e) {
    std::cerr << "runner error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
