#include "server/generation_worker.h"

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "lora/clip_lora.h"
#include "lora/lora_controller.h"
#include "pipeline/flux_pipeline.h"
#include "server/http_error.h"
#include "server/metrics.h"

namespace fluxswap {

namespace fsys = std::filesystem;

namespace {

double seconds_between(ServerClock::time_point a, ServerClock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int status_for(CancelReason why) {
  switch (why) {
    case CancelReason::Timeout: return 504;
    case CancelReason::Disconnect: return 499;  // nginx's "client closed request": nobody reads it
    case CancelReason::Shutdown: return 503;
    default: return 500;
  }
}

}  // namespace

std::string lora_parameters_text(const std::vector<LoraChoice>& loras) {
  std::string text;
  for (const auto& l : loras) {
    const fsys::path p(l.name);
    const std::string stem = p.extension() == ".safetensors" ? p.stem().string() : p.filename().string();
    text += (text.empty() ? "" : ", ") + stem + ":" + std::to_string(l.scale);
  }
  return text;
}

GenerationWorker::GenerationWorker(const ServerOptions& options, RequestQueue& queue, Metrics& metrics,
                                   BackendFactory make_backend)
    : options_(options), queue_(queue), metrics_(metrics), make_backend_(std::move(make_backend)) {
  if (!make_backend_) make_backend_ = [device = options_.device] { return fluxswap::make_backend(device); };
}

GenerationWorker::~GenerationWorker() { join(); }

void GenerationWorker::start() { thread_ = std::thread([this] { run(); }); }

void GenerationWorker::join() {
  if (thread_.joinable()) thread_.join();
}

std::string GenerationWorker::load_error() const {
  std::lock_guard lock(mutex_);
  return load_error_;
}

void GenerationWorker::cancel_running(CancelReason why) {
  std::lock_guard lock(mutex_);
  if (running_) running_->request_cancel(why);
}

void GenerationWorker::run() {
  try {
    backend_ = make_backend_();
    pipeline_ = FluxPipeline::from_pretrained(options_.model, *backend_);
    if (options_.fp8 || options_.fp8_attention)
      pipeline_->transformer().set_precision(options_.fp8 || pipeline_->transformer().fp8(), options_.fp8_attention);
    // An FP8 checkpoint has no bf16 base to merge into: its LoRAs run as runtime slots.
    const std::string lora_mode = pipeline_->transformer().weights().fp8_only ? "runtime" : options_.lora_mode;
    lora_ = std::make_unique<LoraController>(pipeline_->transformer(), lora_mode_from_name(lora_mode),
                                             options_.lora_max_rank);
    lora_->set_cache_capacity(options_.lora_cache);
    model_.config = pipeline_->transformer().config();
    model_.path = pipeline_->path();
    model_.display_name = model_display_name(options_.model);
    model_.backend_name = backend_->name();
    model_.host_memory = backend_->host_buffer_allocator();
    model_.guidance_distilled = pipeline_->is_guidance_distilled();
    model_.default_size = pipeline_->vae_scale_factor() >= 8 ? 1024 : 64 * pipeline_->vae_scale_factor();
    state_ = State::Ready;  // publishes model_ to the handler threads
  } catch (const std::exception& e) {
    {
      std::lock_guard lock(mutex_);
      load_error_ = e.what();
    }
    state_ = State::Failed;
  }
  if (ready()) {
    if (backend_->device() != Device::CPU) metrics_.have_gpu_memory = true;
    while (auto job = queue_.pop(applied_key_)) serve(std::move(job));
  }
  // The controller restores the model it changed, so it goes before the pipeline, which goes before the backend.
  lora_.reset();
  pipeline_.reset();
  backend_.reset();
}

void GenerationWorker::serve(std::shared_ptr<GenerationJob> job) {
  const auto picked = ServerClock::now();
  {
    std::lock_guard lock(mutex_);
    running_ = job;
  }
  metrics_.in_progress = 1;
  int status = 200;
  std::string error;
  GenerateParams p;
  GenerateResult result;
  double swap_s = 0;
  try {
    const ImageRequest& r = job->request;
    if (picked > job->deadline) job->request_cancel(CancelReason::Timeout);
    if (job->cancel_reason() != CancelReason::None) throw Error("cancelled while queued");
    if (job->adapter_key != applied_key_) {
      const std::string before = applied_key_;
      applied_key_ = "\x01unknown";  // if anything but validation fails midway, re-apply next time
      try {
        const auto t0 = std::chrono::steady_clock::now();
        set_loras_with_clip(pipeline_->clip(), job->adapters, [&] { lora_->set_adapters(job->adapters); });
        swap_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      } catch (const Error& e) {
        applied_key_ = before;  // set_adapters validates before it changes anything
        throw HttpError(422, std::string("the LoRA set cannot be applied to this model: ") + e.what());
      }
      applied_key_ = job->adapter_key;
      metrics_.lora_swaps++;
      metrics_.lora_swap_seconds = metrics_.lora_swap_seconds.load() + swap_s;
    }
    p.prompts.assign(size_t(r.n), r.prompt);
    p.width = r.width;
    p.height = r.height;
    p.steps = r.steps;
    p.guidance = model_.guidance_distilled ? r.guidance : 0.0f;
    p.seed = job->seed;
    // Between steps only: a step is the unit the GPU work is issued in.
    p.should_cancel = [&job] {
      if (ServerClock::now() > job->deadline) job->request_cancel(CancelReason::Timeout);
      return job->cancel_reason() != CancelReason::None;
    };
    result = pipeline_->generate(p);
    p.should_cancel = nullptr;
  } catch (const HttpError& e) {
    status = e.status();
    error = e.what();
  } catch (const std::exception& e) {
    const CancelReason why = job->cancel_reason();
    status = why == CancelReason::None ? 500 : status_for(why);
    error = why == CancelReason::None ? std::string("generation failed: ") + e.what() : e.what();
  }
  p.should_cancel = nullptr;  // it refers to the job; the job keeps a copy of the params
  if (status == 200) {
    metrics_.generations++;
    metrics_.images += result.images.size();
  }
  if (metrics_.have_gpu_memory) {
    metrics_.gpu_memory_bytes = backend_->memory_in_use();
    metrics_.gpu_memory_peak_bytes = backend_->peak_memory();
  }
  metrics_.in_progress = 0;
  {
    std::lock_guard lock(mutex_);
    running_.reset();
  }
  {
    std::lock_guard lock(job->mutex);
    job->status = status;
    job->error = std::move(error);
    job->result = std::move(result);
    job->params = std::move(p);
    job->started_s = seconds_between(job->arrived, picked);
    job->swap_s = swap_s;
    job->done = true;
  }
  job->done_cv.notify_all();
}

}  // namespace fluxswap
