// The rows of `--lora-read-sweep`, all from the same file, medians of 3:
//  - pread / mapped: the read into pinned memory alone, over reader threads and chunk sizes (FLUXSWAP_READ_*);
//  - pinned+dma: today's swap path up to the device: the read into pinned memory (default settings) then one DMA,
//    and the same with each 16 MiB sent as it lands (what a swap from the file does);
//  - register-whole: the file mapped shared, its data pinned in place by one cudaHostRegister (read-only), one DMA,
//    unpinned, unmapped, every phase timed, with and without MAP_POPULATE;
//  - register-chunked: pinned in chunks by 1 or 4 threads while the pinned ones are sent, unpinned behind the DMA,
//    from the path to every byte on the device (the idea of issue 5: no CPU copy at all).
// A row that fails says so and the sweep goes on; a backend that cannot pin says why in its rows.
#include "cli/lora_read_sweep.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>

#include "cli/bench_timing.h"
#include "io/safetensors.h"
#include "lora/streamed_upload.h"

namespace fluxswap {

namespace {

using Clock = BenchClock;
using Copies = std::vector<std::pair<Tensor, Tensor>>;

double ms_since(Clock::time_point t) { return seconds_since(t) * 1e3; }

// The file's data region as one copy into `dev` (U8), or one copy per tensor in file order (what an adapter's
// upload sends: ~1000 of them for a FLUX adapter on every block linear).
Copies region_copies(const SafetensorsFile& f, const Tensor& dev, bool per_tensor) {
  const auto [p, n] = f.data_region();
  auto* base = static_cast<char*>(const_cast<void*>(p));
  auto copy = [&](uint64_t at, uint64_t bytes) {
    return std::pair{Tensor::borrow(base + at, DType::U8, {int64_t(bytes)}), dev.narrow(0, int64_t(at), int64_t(bytes))};
  };
  Copies copies;
  if (!per_tensor) {
    copies.push_back(copy(0, n));
    return copies;
  }
  for (const auto& e : f.entries())
    if (e.end > e.begin) copies.push_back(copy(e.begin, e.end - e.begin));
  return copies;
}

// Medians of 3 runs of `run`, field by field.
nlohmann::json median_of_3(const std::function<std::map<std::string, double>()>& run) {
  std::map<std::string, std::vector<double>> all;
  for (int i = 0; i < 3; ++i)
    for (const auto& [k, v] : run()) all[k].push_back(v);
  nlohmann::json out;
  for (const auto& [k, v] : all) out[k] = median_of(v);
  return out;
}

// One row, guarded: a failure is printed and kept as the row's "error".
void row(nlohmann::json& rows, nlohmann::json fields, const std::function<void(nlohmann::json&)>& fill) {
  try {
    fill(fields);
  } catch (const std::exception& e) {
    std::printf("    %s: FAILED: %s\n", fields.value("mode", "?").c_str(), e.what());
    fields["error"] = e.what();
  }
  rows.push_back(std::move(fields));
}

void pread_rows(const std::string& file, const HostBufferAllocator& host, double mb, nlohmann::json& rows) {
  for (bool mapped : {false, true})
    for (unsigned threads : {1u, 4u, 8u, 16u, 32u})
      for (uint64_t chunk_mb : {1, 4}) {
        row(rows, {{"mode", mapped ? "mapped" : "pread"}, {"threads", threads}, {"chunk_mib", chunk_mb}},
            [&](nlohmann::json& r) {
              SafetensorsReadOptions ro;
              ro.threads = threads, ro.chunk_bytes = chunk_mb << 20, ro.from_mapping = mapped;
              std::vector<double> ms;
              for (int i = 0; i < 3; ++i) {
                const auto t0 = Clock::now();
                SafetensorsFile::read(file, host, ro);
                ms.push_back(ms_since(t0));
              }
              const double med = median_of(ms);
              std::printf("    %-7s %2u threads, %llu MiB chunks: %6.1f ms = %5.1f GB/s\n", mapped ? "mapped" : "pread",
                          threads, (unsigned long long)chunk_mb, med, mb / med);
              r["ms_median"] = med, r["gb_per_s"] = mb / med;
            });
      }
}

// Today's path: into pinned memory by the reader threads, then by DMA (after the read, or as it lands).
void pinned_rows(const std::string& file, Backend& be, const Tensor& dev, double mb, nlohmann::json& rows) {
  const HostBufferAllocator host = be.host_buffer_allocator();
  row(rows, {{"mode", "pinned+dma"}}, [&](nlohmann::json& r) {
    r.update(median_of_3([&] {
      const auto t0 = Clock::now();
      const auto f = SafetensorsFile::read(file, host);
      const double read_ms = ms_since(t0);
      be.copy_from_host_batch(region_copies(*f, dev, false));
      be.synchronize();
      return std::map<std::string, double>{{"read_ms", read_ms}, {"on_device_ms", ms_since(t0)}};
    }));
    std::printf("    pread into pinned memory (default readers) %.1f ms, then one DMA: on the device at %.1f ms "
                "(%.1f GB/s from the path)\n",
                double(r["read_ms"]), double(r["on_device_ms"]), mb / double(r["on_device_ms"]));
  });
  row(rows, {{"mode", "pinned+dma pipelined"}, {"batch_mib", 16}}, [&](nlohmann::json& r) {
    r.update(median_of_3([&] {
      const auto t0 = Clock::now();
      const auto f = SafetensorsFile::read_in_background(file, host);
      upload_as_it_arrives(f.get(), region_copies(*f, dev, true), size_t(16) << 20,
                           [&](const HostToDevice& b) { be.copy_from_host_batch(b); });
      be.synchronize();
      const double on_device = ms_since(t0);
      f->wait_until_read();
      return std::map<std::string, double>{{"read_ms", f->read_seconds() * 1e3}, {"on_device_ms", on_device}};
    }));
    std::printf("    pread into pinned memory, each 16 MiB sent as it lands (a swap's path): read %.1f ms, on the "
                "device at %.1f ms (%.1f GB/s)\n",
                double(r["read_ms"]), double(r["on_device_ms"]), mb / double(r["on_device_ms"]));
  });
}

// The file mapped shared and pinned in place: no CPU copy. `last` gets the backend's report.
std::map<std::string, double> registered_run(const std::string& file, Backend& be, const Tensor& dev, bool populate,
                                             const RegisteredUploadOptions& o, bool per_tensor,
                                             RegisteredUploadReport* last) {
  const auto t0 = Clock::now();
  auto f = SafetensorsFile::open_shared(file, populate);
  const double map_ms = ms_since(t0);
  const auto [p, n] = f->data_region();
  const Copies copies = region_copies(*f, dev, per_tensor);
  const auto t1 = Clock::now();
  const RegisteredUploadReport rep = be.copy_from_host_registered(p, n, copies, o);
  be.synchronize();  // the CUDA backend has already; another one may not have
  const double returned_ms = ms_since(t0), before_call_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
  const auto t2 = Clock::now();
  f.reset();  // the copies' views do not hold the mapping: this unmaps
  const double munmap_ms = ms_since(t2);
  *last = rep;
  return {{"map_ms", map_ms},
          {"register_ms", rep.register_seconds * 1e3},
          {"dma_ms", rep.dma_seconds * 1e3},
          {"wait_ms", rep.wait_seconds * 1e3},
          {"unregister_ms", rep.unregister_seconds * 1e3},
          {"munmap_ms", munmap_ms},
          {"on_device_ms", before_call_ms + rep.on_device_seconds * 1e3},
          {"returned_ms", returned_ms},
          {"pinned_fraction", double(rep.direct_bytes) / double(std::max<size_t>(1, rep.direct_bytes + rep.other_bytes))}};
}

// Whether the last run pinned anything (its phase times mean something then), noted in the row.
bool note_fallback(nlohmann::json& r, const RegisteredUploadReport& rep) {
  r["registered"] = rep.registered;
  r["chunks"] = rep.chunks;
  r["registered_chunks"] = rep.registered_chunks;
  if (!rep.registered) r["fallback"] = rep.fallback;
  return rep.registered_chunks > 0;
}

// After a row's line: why it did not all go pinned in place.
void say_fallback(const RegisteredUploadReport& rep) {
  if (rep.registered) return;
  std::printf("      NOT all pinned in place (%zu of %zu chunks): %s; the rest went the ordinary way\n",
              rep.registered_chunks, rep.chunks, rep.fallback.c_str());
}

void registered_rows(const std::string& file, Backend& be, const Tensor& dev, double mb, nlohmann::json& rows) {
  RegisteredUploadReport rep;
  const size_t whole = size_t(std::filesystem::file_size(file)) + (size_t(1) << 20);
  for (bool populate : {false, true})
    row(rows, {{"mode", "register-whole"}, {"populate", populate}}, [&](nlohmann::json& r) {
      RegisteredUploadOptions o;
      o.chunk_bytes = whole, o.threads = 1;
      r.update(median_of_3([&] { return registered_run(file, be, dev, populate, o, false, &rep); }));
      if (!populate && !rep.support.empty()) std::printf("    device: %s\n", rep.support.c_str());
      if (!note_fallback(r, rep)) {
        std::printf("    register whole file%s: on the device at %.1f ms without pinning\n",
                    populate ? " (MAP_POPULATE)" : "", double(r["on_device_ms"]));
        say_fallback(rep);
        return;
      }
      const double reg = r["register_ms"], dma = r["dma_ms"];
      std::printf("    register whole file%s: map+parse %.1f ms, cudaHostRegister %.1f ms (%.1f GB/s), DMA %.1f ms "
                  "(%.1f GB/s), cudaHostUnregister %.1f ms, munmap %.1f ms; on the device at %.1f ms\n",
                  populate ? " (MAP_POPULATE)" : "", double(r["map_ms"]), reg, mb / reg, dma, mb / dma,
                  double(r["unregister_ms"]), double(r["munmap_ms"]), double(r["on_device_ms"]));
      say_fallback(rep);
    });
  bool checked = false;
  for (uint64_t chunk_mib : {16, 64, 256})
    for (unsigned threads : {1u, 4u})
      for (bool per_tensor : {false, true}) {
        if (per_tensor && (chunk_mib != 64 || threads != 4)) continue;  // the defaults, one copy per tensor
        row(rows, {{"mode", "register-chunked"}, {"chunk_mib", chunk_mib}, {"threads", threads},
                   {"per_tensor", per_tensor}},
            [&](nlohmann::json& r) {
              RegisteredUploadOptions o;
              o.chunk_bytes = size_t(chunk_mib) << 20, o.threads = threads;
              r.update(median_of_3([&] { return registered_run(file, be, dev, false, o, per_tensor, &rep); }));
              const double on = r["on_device_ms"];
              if (!note_fallback(r, rep)) {
                std::printf("    register %3llu MiB chunks: on the device at %.1f ms without pinning\n",
                            (unsigned long long)chunk_mib, on);
                say_fallback(rep);
                return;
              }
              std::printf("    register %3llu MiB chunks, %u thread%s%s: on the device at %.1f ms (%.1f GB/s from the "
                          "path), returned at %.1f ms; map %.1f, pinning %.1f (summed over threads), DMA %.1f, waited "
                          "for pinning %.1f, unpinning %.1f ms\n",
                          (unsigned long long)chunk_mib, threads, threads == 1 ? "" : "s",
                          per_tensor ? ", per tensor" : "", on, mb / on, double(r["returned_ms"]),
                          double(r["map_ms"]), double(r["register_ms"]), double(r["dma_ms"]), double(r["wait_ms"]),
                          double(r["unregister_ms"]));
              say_fallback(rep);
            });
        if (checked) continue;
        checked = true;
        row(rows, {{"mode", "register-check"}}, [&](nlohmann::json& r) {
          // The bytes the last pinned upload left on the device, against the file's.
          const auto f = SafetensorsFile::open_shared(file, false);
          const auto [p, n] = f->data_region();
          const auto host = be.host_buffer_allocator()(n);
          be.copy_to_host(dev.narrow(0, 0, int64_t(n)), Tensor::borrow(host.get(), DType::U8, {int64_t(n)}));
          be.synchronize();
          const bool same = std::memcmp(host.get(), p, n) == 0;
          std::printf("    device bytes after a pinned-in-place upload %s the file's\n", same ? "equal" : "DIFFER FROM");
          r["bytes_equal"] = same;
        });
      }
}

}  // namespace

nlohmann::json lora_read_sweep(const std::string& file, Backend& be) {
  nlohmann::json rows = nlohmann::json::array();
  const HostBufferAllocator host = be.host_buffer_allocator();
  const double mb = double(std::filesystem::file_size(file)) / 1e6;
  std::printf("  read-only sweep of %s (%.0f MB; median of 3):\n", file.c_str(), mb);
  if (!host) {
    std::printf("    skipped: the %s backend reads no files into its own host memory\n", be.name().c_str());
    return rows;
  }
  pread_rows(file, host, mb, rows);
  std::printf("  to the device (%s; median of 3):\n", be.name().c_str());
  Tensor dev;
  try {
    dev = be.empty(DType::U8, {int64_t(std::filesystem::file_size(file))});
  } catch (const std::exception& e) {
    std::printf("    no device buffer for the file: %s\n", e.what());
    return rows;
  }
  pinned_rows(file, be, dev, mb, rows);
  registered_rows(file, be, dev, mb, rows);
  return rows;
}

}  // namespace fluxswap
