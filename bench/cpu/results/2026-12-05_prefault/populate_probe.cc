// Probe (RESULTS section 7): writing 512 MiB into fresh memory, page faults against one
// madvise(MADV_POPULATE_WRITE) first.   g++ -O2 populate_probe.cc -o probe && ./probe
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
int main() {
  std::vector<uint8_t> src(4 << 20, 1);
  for (int mode = 0; mode < 2; ++mode)
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<uint8_t> v;
      v.reserve(512 << 20);
      double t0 = now();
      if (mode) {
        uintptr_t page = 4096;
        uintptr_t b = (uintptr_t)v.data();
        uintptr_t f = (b + page - 1) & ~(page - 1), l = (b + v.capacity()) & ~(page - 1);
        madvise((void*)f, l - f, MADV_POPULATE_WRITE);
      }
      double t1 = now();
      for (int i = 0; i < 128; i++) v.insert(v.end(), src.begin(), src.end());
      double t2 = now();
      printf("%s populate %.1f ms insert %.1f ms total %.1f ms (%.2f GB/s)\n",
             mode ? "prefault" : "faults  ", (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3,
             0.536870912 / (t2 - t0));
    }
}
