// Runs a model with qgoft layers from C++ without Python: a TorchScript module (torch.jit.save) or,
// with --aoti, an AOTInductor package (torch._inductor.aoti_compile_and_package).
//
//   qgoft_infer [--aoti] MODEL INPUT.pt [OUTPUT.pt]
//
// INPUT.pt holds one tensor written by Python's torch.save; the output tensor is printed and, if
// OUTPUT.pt is given, written so that Python's torch.load reads it. The qgoft ops come from
// libqgoft_ops.so, linked into this program (its static initializers register torch.ops.qgoft.*).
#include <ATen/core/Formatting.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/csrc/jit/serialization/pickle.h>
#ifdef QGOFT_WITH_AOTI
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#endif

#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot create ", path);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  TORCH_CHECK(file, "cannot write ", path);
}

// Fails early, with a clear message, when the ops library did not get linked or loaded.
void require_qgoft_ops() {
  for (const char* name : {"qgoft::givens_chain", "qgoft::quasi_givens_chain"}) {
    TORCH_CHECK(c10::Dispatcher::singleton().findSchema({name, ""}).has_value(), "operator ", name,
                " is not registered: link libqgoft_ops.so with -Wl,--no-as-needed (or dlopen it)");
  }
}

at::Tensor run_torchscript(const std::string& model_path, const at::Tensor& input) {
  torch::jit::Module module = torch::jit::load(model_path);
  module.eval();
  return module.forward({input}).toTensor();
}

#ifdef QGOFT_WITH_AOTI
at::Tensor run_aoti(const std::string& package_path, const at::Tensor& input) {
  torch::inductor::AOTIModelPackageLoader loader(package_path);
  std::vector<at::Tensor> outputs = loader.run({input});
  TORCH_CHECK(outputs.size() == 1, "expected one output, the package returned ", outputs.size());
  return outputs[0];
}
#endif

int usage(const char* program) {
  std::cerr << "usage: " << program << " [--aoti] MODEL INPUT.pt [OUTPUT.pt]\n"
            << "  MODEL: a TorchScript file (torch.jit.save) or, with --aoti, an AOTInductor .pt2 package\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  bool aoti = !args.empty() && args[0] == "--aoti";
  if (aoti) {
    args.erase(args.begin());
  }
  if (args.size() != 2 && args.size() != 3) {
    return usage(argv[0]);
  }
#ifndef QGOFT_WITH_AOTI
  if (aoti) {
    std::cerr << "this build has no AOTInductor support (configure with -DQGOFT_WITH_AOTI=ON, torch >= 2.6)\n";
    return 2;
  }
#endif
  try {
    require_qgoft_ops();
    const at::Tensor input = torch::jit::pickle_load(read_bytes(args[1])).toTensor();
    c10::InferenceMode inference_mode;
#ifdef QGOFT_WITH_AOTI
    const at::Tensor output = aoti ? run_aoti(args[0], input) : run_torchscript(args[0], input);
#else
    const at::Tensor output = run_torchscript(args[0], input);
#endif
    std::cout << "input " << input.sizes() << " -> output " << output.sizes() << " " << output.dtype()
              << "\n"
              << output << "\n";
    if (args.size() == 3) {
      write_bytes(args[2], torch::jit::pickle_save(output.contiguous()));
    }
  } catch (const c10::Error& error) {
    std::cerr << "qgoft_infer: " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "qgoft_infer: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
