// Reuse of large, huge-page-backed CPU buffers across calls.
//
// A kernel producing ~20 MB of fresh output per image (one 1024 canvas in fp32 is 12 MB) spends a
// large share of its time in the kernel's page-fault path zeroing new pages: glibc returns big
// blocks to the OS on free and the next call faults them in again. Buffers from here are 2 MB
// aligned (transparent huge pages where offered: 512x fewer faults) and, once released, are kept
// for the next request of the same size, up to a bounded number of bytes. Thread-safe: tensors
// may be freed on any thread.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include <sys/mman.h>

namespace eagle_fast {

class PageCache {
 public:
  static constexpr size_t kHuge = size_t{2} << 20;
  static constexpr size_t kMaxCachedBytes = size_t{256} << 20;  // bound on idle memory held

  // Process-wide instance: the cache is an allocator, shared like the allocator it bypasses.
  static PageCache& instance() {
    static PageCache* cache = new PageCache();  // never destroyed: tensors may outlive statics
    return *cache;
  }

  void* acquire(size_t nbytes) {
    const size_t size = round_up(nbytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].size == size) {
          void* p = free_[i].ptr;
          cached_bytes_ -= size;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          return p;
        }
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, size) != 0) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    return p;
  }

  void release(void* p, size_t nbytes) {
    const size_t size = round_up(nbytes);
    if (std::getenv("EF_NOCACHE")) {
      std::free(p);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    // Oldest blocks go first when the bound is reached; a block larger than the bound is freed.
    while (!free_.empty() && cached_bytes_ + size > kMaxCachedBytes) {
      std::free(free_.front().ptr);
      cached_bytes_ -= free_.front().size;
      free_.erase(free_.begin());
    }
    if (size > kMaxCachedBytes) {
      std::free(p);
      return;
    }
    free_.push_back({p, size});
    cached_bytes_ += size;
  }

  // A CPU tensor whose storage comes from (and returns to) the cache.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
    const size_t nbytes = c10::multiply_integers(sizes) * c10::elementSize(opt.dtype().toScalarType());
    if (nbytes < kHuge / 2) return at::empty(sizes, opt);  // small: torch's allocator does well
    void* p = acquire(nbytes);
    return at::from_blob(p, sizes, [this, nbytes](void* q) { release(q, nbytes); }, opt);
  }

  // Uninitialized scratch bytes, returned to the cache when the pointer goes.
  struct Releaser {
    size_t nbytes;
    void operator()(uint8_t* p) const { PageCache::instance().release(p, nbytes); }
  };
  using Scratch = std::unique_ptr<uint8_t[], Releaser>;
  Scratch scratch(size_t nbytes) { return Scratch(static_cast<uint8_t*>(acquire(nbytes)), Releaser{nbytes}); }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };
  static size_t round_up(size_t n) { return (std::max<size_t>(n, 1) + kHuge - 1) / kHuge * kHuge; }

  std::mutex mu_;
  std::vector<Block> free_;
  size_t cached_bytes_ = 0;
};

}  // namespace eagle_fast
