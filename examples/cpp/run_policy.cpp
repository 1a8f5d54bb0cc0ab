// Load an exported flowmanip policy with libtorch alone, read its metadata, print one action.
//   run_policy policy.pt
#include <torch/script.h>

#include <iostream>
#include <string>

// Reads an integer field such as "obs_dim": 42 from the metadata JSON (enough for this demo;
// a real controller would use a JSON library).
static long json_int(const std::string& json, const std::string& key) {
  auto pos = json.find("\"" + key + "\":");
  if (pos == std::string::npos) throw std::runtime_error("meta.json has no key " + key);
  return std::stol(json.substr(pos + key.size() + 3));
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: run_policy policy.pt\n";
    return 2;
  }
  torch::jit::ExtraFilesMap extra{{"meta.json", ""}};
  torch::jit::Module policy = torch::jit::load(argv[1], torch::kCPU, extra);
  const std::string& meta = extra["meta.json"];
  const long obs_dim = json_int(meta, "obs_dim");
  const long action_dim = json_int(meta, "action_dim");
  std::cout << "meta.json: " << meta << "\n";

  torch::NoGradGuard no_grad;
  torch::Tensor obs = torch::zeros({1, obs_dim}, torch::kFloat32);
  torch::Tensor action = policy.forward({obs}).toTensor();
  std::cout << "obs_dim " << obs_dim << " action_dim " << action_dim << " output " << action.sizes() << "\n";
  std::cout << "first action:";
  auto first = action.reshape({-1, action_dim})[0];
  for (long i = 0; i < action_dim; ++i) std::cout << " " << first[i].item<float>();
  std::cout << "\n";
  return 0;
}
