#pragma once
// The one thread that owns the backend, the pipeline and the LoRA controller. It loads the model, then runs queued
// jobs one at a time: swap adapters if the job's set differs from the applied one, generate, hand the images back.
// It never touches a socket or encodes a response (handler threads do that), and an exception fails only the job
// that raised it.
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "backend/backend.h"
#include "model/flux_config.h"
#include "server/request_queue.h"
#include "server/server_options.h"

namespace fluxswap {

class Metrics;
class LoraController;

using BackendFactory = std::function<std::unique_ptr<Backend>()>;

// What handler threads may read once the worker says the model is ready (immutable from then on).
struct LoadedModel {
  FluxConfig config;
  std::string path, display_name, backend_name;
  bool guidance_distilled = true;
  int default_size = 1024;
  // Where handler threads read LoRA files to (pinned on the GPU: the adapter cache then holds them there and an
  // upload is one DMA); thread-safe.
  HostBufferAllocator host_memory;
};

class GenerationWorker {
 public:
  GenerationWorker(const ServerOptions& options, RequestQueue& queue, Metrics& metrics, BackendFactory make_backend);
  ~GenerationWorker();  // joins; close the queue first

  void start();
  void join();
  bool ready() const { return state_.load() == State::Ready; }
  bool failed() const { return state_.load() == State::Failed; }
  std::string load_error() const;
  const LoadedModel& model() const { return model_; }  // only once ready()

  // Asks the job being generated, if any, to stop (server shutdown).
  void cancel_running(CancelReason why);

 private:
  enum class State { Loading, Ready, Failed, Stopped };
  void run();
  void serve(std::shared_ptr<GenerationJob> job);

  const ServerOptions options_;
  RequestQueue& queue_;
  Metrics& metrics_;
  BackendFactory make_backend_;
  std::thread thread_;
  std::atomic<State> state_{State::Loading};
  mutable std::mutex mutex_;
  std::string load_error_;
  std::shared_ptr<GenerationJob> running_;  // guarded by mutex_
  LoadedModel model_;

  // Worker-thread only.
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<FluxPipeline> pipeline_;
  std::unique_ptr<LoraController> lora_;
  std::string applied_key_;  // adapter set on the model now
};

// The Lora: field of the PNG parameters, as `fluxswap generate` writes it ("stem:weight, ...").
std::string lora_parameters_text(const std::vector<LoraChoice>& loras);

}  // namespace fluxswap
