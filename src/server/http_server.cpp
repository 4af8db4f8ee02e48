#include "server/http_server.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "backend/backend.h"
#include "server/connection_probe.h"
#include "server/generation_worker.h"
#include "server/http_error.h"
#include "server/image_request.h"
#include "server/lora_registry.h"
#include "server/metrics.h"
#include "pipeline/png_image.h"
#include "server/base64.h"
#include "server/request_queue.h"

namespace fluxswap {

namespace {

using nlohmann::json;
using httplib::Request;
using httplib::Response;

// How often a waiting handler looks at its deadline and its client. Completion itself wakes it at once.
constexpr auto kPollInterval = std::chrono::milliseconds(20);
// Threads for requests that are not generations (/health, /metrics, answers of 4xx) beyond those that may be
// waiting on queued or running jobs: enough that a full queue never makes the server unobservable.
constexpr size_t kSpareHttpThreads = 16;

const char* error_type(int status) {
  switch (status) {
    case 400: return "invalid_request_error";
    case 404: return "not_found";
    case 413: return "payload_too_large";
    case 422: return "unprocessable_lora";
    case 429: return "queue_full";
    case 499: return "client_closed_request";
    case 503: return "unavailable";
    case 504: return "timeout";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

void send_json(Response& res, int status, const json& body) {
  res.status = status;
  // Messages quote client text cut to a length, which may split a UTF-8 sequence: replace rather than throw.
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

void send_error(Response& res, int status, const std::string& message) {
  send_json(res, status, {{"error", {{"message", message}, {"type", error_type(status)}, {"status", status}}}});
}

double seconds_since(ServerClock::time_point t) {
  return std::chrono::duration<double>(ServerClock::now() - t).count();
}

std::string fixed(double v, int digits) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string timeout_message(double timeout_s, bool was_queued) {
  return "the request timed out after " + fixed(timeout_s, 3) + " s " +
         (was_queued ? "while waiting in the queue" : "while generating: cancelled between steps");
}

// Identifies an adapter set for grouping. The adapter's address stands for its file: the cache hands every request
// the same object until the file changes on disk, and an object that the controller holds applied cannot be freed
// and its address reused. Order counts: stacking order changes float rounding, and equal keys must mean equal images.
std::string adapter_key(const std::vector<ActiveLora>& adapters) {
  std::string key;
  for (const auto& a : adapters) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%p@%a;", static_cast<const void*>(a.adapter.get()), double(a.weight));
    key += buf;
  }
  return key;
}

}  // namespace

struct ImageServer::Impl {
  ServerOptions options;
  Metrics metrics;
  RequestQueue queue;
  LoraRegistry registry;
  AdapterCache cache;
  GenerationWorker worker;
  httplib::Server http;
  std::thread listener;
  std::atomic<bool> listen_returned{false}, stopping{false};
  int port = -1;
  std::mutex seed_mutex;
  std::mt19937_64 seed_rng{std::random_device{}()};

  Impl(const ServerOptions& o, std::function<std::unique_ptr<Backend>()> make_backend)
      : options(o),
        queue(o.queue_size, o.max_bypass),
        registry(o.lora_dir),
        cache(o.lora_cache, metrics),
        worker(o, queue, metrics, std::move(make_backend)) {
    routes();
  }

  // Every handler's failures become JSON errors; nothing a request does can take the server down.
  template <typename F>
  httplib::Server::Handler guarded(F handler) {
    return [this, handler](const Request& req, Response& res) {
      try {
        (this->*handler)(req, res);
      } catch (const HttpError& e) {
        send_error(res, e.status(), e.what());
      } catch (const std::exception& e) {
        send_error(res, 500, std::string("internal error: ") + e.what());
      }
    };
  }

  void routes() {
    const size_t threads = options.queue_size + 1 + kSpareHttpThreads;
    http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    http.set_payload_max_length(options.max_body_bytes);
    http.Get("/health", guarded(&Impl::health));
    http.Get("/ready", guarded(&Impl::ready));
    http.Get("/metrics", guarded(&Impl::metrics_text));
    http.Get("/v1/loras", guarded(&Impl::list_loras));
    http.Post("/v1/loras/load", guarded(&Impl::load_lora));
    http.Post("/v1/images/generations", guarded(&Impl::generate));
    // httplib calls this for every response of status >= 400, whoever produced it, before writing it: the place to
    // count errors (a logger runs after the write, so a client could see its answer before the count), and to give
    // the errors httplib answers itself (no route, body over the limit, unparsable HTTP) a JSON body.
    http.set_error_handler(httplib::Server::HandlerWithResponse([this](const Request& req, Response& res) {
      metrics.count_error(res.status);
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      std::string message = "HTTP error " + std::to_string(res.status);
      if (res.status == 404) message = "no route " + req.method + " " + req.path;
      if (res.status == 413)
        message = "request body is over " + std::to_string(options.max_body_bytes) + " bytes (--max-body-bytes)";
      send_error(res, res.status, message);
      return httplib::Server::HandlerResponse::Handled;
    }));
    http.set_exception_handler([](const Request&, Response& res, std::exception_ptr) {
      send_error(res, 500, "internal error");
    });
  }

  void health(const Request&, Response& res) { send_json(res, 200, {{"status", "ok"}}); }

  void ready(const Request&, Response& res) {
    if (worker.ready()) {
      const LoadedModel& m = worker.model();
      send_json(res, 200, {{"status", "ready"}, {"model", m.display_name}, {"backend", m.backend_name}});
    } else if (worker.failed()) {
      send_json(res, 503, {{"status", "failed"}, {"error", worker.load_error()}});
    } else {
      send_json(res, 503, {{"status", "loading"}});
    }
  }

  void metrics_text(const Request&, Response& res) {
    res.set_content(metrics.render(queue.depth(), worker.ready()), "text/plain; version=0.0.4; charset=utf-8");
  }

  void require_ready() {
    if (worker.failed()) throw HttpError(503, "the model failed to load: " + worker.load_error());
    if (!worker.ready()) throw HttpError(503, "the model is still loading (GET /ready says when it is done)");
  }

  void list_loras(const Request&, Response& res) {
    json data = json::array();
    for (const auto& e : registry.list())
      data.push_back({{"name", e.name}, {"file", e.file}, {"bytes", e.bytes}, {"cached", cache.contains(registry.resolve(e.name))}});
    send_json(res, 200, {{"object", "list"}, {"data", data}});
  }

  void load_lora(const Request& req, Response& res) {
    require_ready();
    json j;
    try {
      j = json::parse(req.body);
    } catch (const json::parse_error& e) {
      throw HttpError(400, std::string("request body is not valid JSON: ") + e.what());
    }
    if (!j.is_object() || !j.contains("name") || !j["name"].is_string())
      throw HttpError(400, "expected {\"name\": \"<LoRA name>\"}");
    const std::string name = j["name"].get<std::string>();
    bool was_cached = false;
    auto adapter = cache.get(name, registry.resolve(name), worker.model().config, &was_cached,
                             worker.model().host_memory);
    send_json(res, 200, {{"name", name},
                         {"format", adapter->format},
                         {"pairs", adapter->pairs.size()},
                         {"tensors", adapter->tensors_used},
                         {"clip_pairs", adapter->clip_pairs.size()},
                         {"clip_tensors", adapter->clip_tensors_used},
                         {"ignored_keys", adapter->ignored_keys.size()},
                         {"was_cached", was_cached}});
  }

  uint64_t draw_seed() {
    std::lock_guard lock(seed_mutex);
    return seed_rng() >> 1;  // 63 bits: any JSON client can read it back as a signed integer
  }

  void generate(const Request& req, Response& res) {
    const auto arrived = ServerClock::now();
    require_ready();
    const LoadedModel& model = worker.model();
    auto job = std::make_shared<GenerationJob>();
    job->request = parse_image_request(req.body, options);
    const ImageRequest& r = job->request;
    job->seed = r.seed ? *r.seed : draw_seed();
    for (const LoraChoice& c : r.loras)
      job->adapters.push_back({cache.get(c.name, registry.resolve(c.name), model.config, nullptr, model.host_memory),
                                c.scale});
    job->adapter_key = adapter_key(job->adapters);
    job->lora_text = lora_parameters_text(r.loras);
    job->arrived = arrived;
    const double timeout_s = r.timeout_s > 0 ? r.timeout_s : options.timeout_s;
    job->deadline = arrived + std::chrono::duration_cast<ServerClock::duration>(std::chrono::duration<double>(timeout_s));
    if (stopping) throw HttpError(503, "the server is shutting down");
    if (!queue.push(job)) {
      if (stopping) throw HttpError(503, "the server is shutting down");
      res.set_header("Retry-After", "1");
      throw HttpError(429, "the queue is full (" + std::to_string(options.queue_size) +
                               " requests waiting, --queue-size): retry later");
    }
    const int status = wait_for(job, ConnectionProbe(req), timeout_s, res);
    metrics.observe_latency(seconds_since(arrived));
    if (status == 504) metrics.cancelled_timeout++;
    if (status == 499) metrics.cancelled_disconnect++;
    if (status != 200) return;

    json data = json::array();
    const GenerateParams& p = job->params;
    for (size_t i = 0; i < job->result.images.size(); ++i) {
      const std::string text = generation_parameters_text(p.prompts[i], p, job->result, model.display_name, job->lora_text);
      data.push_back({{"b64_json", base64_encode(encode_png(job->result.images[i], {{"parameters", text}}))}});
    }
    const auto& g = job->result;
    send_json(res, 200,
              {{"created", std::chrono::duration_cast<std::chrono::seconds>(
                               std::chrono::system_clock::now().time_since_epoch()).count()},
               {"data", data},
               {"seed", job->seed},
               {"size", std::to_string(g.width) + "x" + std::to_string(g.height)},
               {"steps", g.steps},
               {"timings",
                {{"queued_s", job->started_s},
                 {"lora_swap_s", job->swap_s},
                 {"encode_s", g.encode_s},
                 {"denoise_s", g.denoise_s},
                 {"decode_s", g.decode_s},
                 {"total_s", seconds_since(arrived)}}}});
  }

  // Waits for the worker to answer the job, or for its deadline or its client to go; returns the status it sent
  // (200: the job's result is ready to encode).
  int wait_for(const std::shared_ptr<GenerationJob>& job, const ConnectionProbe& probe, double timeout_s, Response& res) {
    std::unique_lock lock(job->mutex);
    while (!job->done) {
      job->done_cv.wait_for(lock, kPollInterval);
      if (job->done) break;
      CancelReason why = CancelReason::None;
      if (ServerClock::now() > job->deadline)
        why = CancelReason::Timeout;
      else if (probe.closed())
        why = CancelReason::Disconnect;
      if (why == CancelReason::None) continue;
      lock.unlock();
      // Answer now rather than after the worker reaches the end of its step: the worker stops on its own.
      job->request_cancel(why);
      const bool was_queued = queue.remove(job.get());
      if (job->cancel_reason() == CancelReason::Shutdown) {
        send_error(res, 503, "the server is shutting down");
        return 503;
      }
      if (why == CancelReason::Disconnect) {
        send_error(res, 499, "the client closed the connection");
        return 499;
      }
      send_error(res, 504, timeout_message(timeout_s, was_queued));
      return 504;
    }
    // The worker saw the deadline before this thread did.
    if (job->status == 504) send_error(res, 504, timeout_message(timeout_s, false));
    else if (job->status != 200) send_error(res, job->status, job->error);
    return job->status;
  }

  int start() {
    port = options.port == 0 ? http.bind_to_any_port(options.host)
                             : (http.bind_to_port(options.host, options.port) ? options.port : -1);
    if (port < 0)
      throw Error("cannot listen on " + options.host + ":" + std::to_string(options.port) +
                  " (address in use, or not an address of this machine)");
    worker.start();
    listener = std::thread([this] {
      http.listen_after_bind();
      listen_returned = true;
    });
    // stop() is a no-op until the listener is running, so do not hand out a server it could not stop.
    while (!http.is_running() && !listen_returned) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return port;
  }

  void stop() {
    if (stopping.exchange(true)) return;
    // Unblock every handler first: httplib's stop() waits for its threads, and they wait for their jobs.
    for (auto& job : queue.close()) {
      job->request_cancel(CancelReason::Shutdown);
      {
        std::lock_guard lock(job->mutex);
        job->status = 503;
        job->error = "the server is shutting down";
        job->done = true;
      }
      job->done_cv.notify_all();
    }
    worker.cancel_running(CancelReason::Shutdown);
    worker.join();
    if (listener.joinable()) {
      http.stop();
      listener.join();
    }
  }
};

ImageServer::ImageServer(const ServerOptions& options, std::function<std::unique_ptr<Backend>()> make_backend)
    : impl_(std::make_unique<Impl>(options, std::move(make_backend))) {}

ImageServer::~ImageServer() { stop(); }

int ImageServer::start() { return impl_->start(); }

bool ImageServer::wait_ready(double timeout_s) {
  const auto until = ServerClock::now() + std::chrono::duration_cast<ServerClock::duration>(
                                              std::chrono::duration<double>(timeout_s));
  while (!impl_->worker.ready() && !impl_->worker.failed() && ServerClock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  return impl_->worker.ready();
}

bool ImageServer::load_failed() const { return impl_->worker.failed(); }
std::string ImageServer::load_error() const { return impl_->worker.load_error(); }
void ImageServer::stop() { impl_->stop(); }
int ImageServer::port() const { return impl_->port; }

}  // namespace fluxswap
