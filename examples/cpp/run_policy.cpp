// Load an exported flowmanip policy with libtorch alone, read its metadata, print one action.
//   run_policy policy.pt [camera_height camera_width]
// A state policy takes a float32 [B, obs_dim] tensor; an image policy a dict {"rgb": uint8 [B, H, W, C],
// "state": float32 [B, obs_dim]}, where H x W may be the camera's own resolution (the module crops and
// resizes to what it trained on). This demo feeds a zero state and, for image policies, a synthetic frame
// (pixel value (3 h + 5 w + 7 c) mod 256) in place of a camera's.
#include <torch/script.h>

#include <cctype>
#include <iostream>
#include <string>

// Reads an integer field such as "obs_dim": 42 from the metadata JSON (enough for this demo;
// a real controller would use a JSON library).
static long json_int(const std::string& json, const std::string& key) {
  auto pos = json.find("\"" + key + "\":");
  if (pos == std::string::npos) throw std::runtime_error("meta.json has no key " + key);
  return std::stol(json.substr(pos + key.size() + 3));
}

// True when the metadata holds a number (not null) under key.
static bool json_has_int(const std::string& json, const std::string& key) {
  auto pos = json.find("\"" + key + "\":");
  if (pos == std::string::npos) return false;
  auto value = json.find_first_not_of(' ', pos + key.size() + 3);
  return value != std::string::npos && (std::isdigit(json[value]) || json[value] == '-');
}

int main(int argc, char** argv) {
  if (argc != 2 && argc != 4) {
    std::cerr << "usage: run_policy policy.pt [camera_height camera_width]\n";
    return 2;
  }
  torch::jit::ExtraFilesMap extra{{"meta.json", ""}};
  torch::jit::Module policy = torch::jit::load(argv[1], torch::kCPU, extra);
  const std::string& meta = extra["meta.json"];
  const long obs_dim = json_int(meta, "obs_dim");
  const long action_dim = json_int(meta, "action_dim");
  std::cout << "meta.json: " << meta << "\n";

  torch::NoGradGuard no_grad;
  torch::Tensor state = torch::zeros({1, obs_dim}, torch::kFloat32);
  torch::Tensor action;
  if (json_has_int(meta, "rgb_channels")) {  // an image policy: a dict of camera frame and proprioception
    const long height = argc == 4 ? std::stol(argv[2]) : json_int(meta, "rgb_height");
    const long width = argc == 4 ? std::stol(argv[3]) : json_int(meta, "rgb_width");
    c10::Dict<std::string, torch::Tensor> obs;
    const long channels = json_int(meta, "rgb_channels");
    torch::Tensor frame = torch::arange(height).view({1, height, 1, 1}) * 3 + torch::arange(width).view({1, 1, width, 1}) * 5 +
                          torch::arange(channels).view({1, 1, 1, channels}) * 7;
    obs.insert("rgb", frame.remainder(256).to(torch::kUInt8));
    obs.insert("state", state);
    action = policy.forward({obs}).toTensor();
    std::cout << "rgb input " << height << "x" << width << "\n";
  } else {
    action = policy.forward({state}).toTensor();
  }
  std::cout << "obs_dim " << obs_dim << " action_dim " << action_dim << " output " << action.sizes() << "\n";
  std::cout << "first action:";
  auto first = action.reshape({-1, action_dim})[0];
  for (long i = 0; i < action_dim; ++i) std::cout << " " << first[i].item<float>();
  std::cout << "\n";
  return 0;
}
