#include "thread_pool.h"

namespace cmce {

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> guard(lock_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::run(Job& job) {
  for (size_t i; (i = job.next.fetch_add(1)) < job.n;) {
    (*job.fn)(i);
    job.done.fetch_add(1);
  }
}

void ThreadPool::work() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> guard(lock_);
      wake_.wait(guard, [this] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      job = jobs_.front();
      if (job->next.load() >= job->n) {  // nothing left to take: retire it
        jobs_.pop_front();
        continue;
      }
    }
    run(*job);
    if (job->done.load() == job->n) {
      std::lock_guard<std::mutex> guard(lock_);
      finished_.notify_all();
    }
  }
}

void ThreadPool::parallel_for(size_t n, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  if (workers_.empty() || n == 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  {
    std::lock_guard<std::mutex> guard(lock_);
    jobs_.push_back(job);
  }
  wake_.notify_all();
  run(*job);
  std::unique_lock<std::mutex> guard(lock_);
  finished_.wait(guard, [&] { return job->done.load() == job->n; });
  for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
    if (*it == job) {
      jobs_.erase(it);
      break;
    }
  }
}

}  // namespace cmce
