/*
 * How long one cache line takes to go from CPU 0 to CPU 1 and back: the cost every
 * frame pays at least once between the load (CPU 1) and a backend (CPU 0). On a
 * virtual machine it shows where the host placed the two vCPUs at that moment;
 * bench/README.md ("Why runs of one case differ") uses it.
 *
 *   gcc -O2 -pthread -o /tmp/line_round_trip bench/line_round_trip.c
 *   for i in $(seq 60); do /tmp/line_round_trip; sleep 0.5; done
 *
 * Prints the mean round trip in ns over 20000 round trips, or "busy" when the other
 * thread did not answer within a second (a CPU taken by something else).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

enum { ROUND_TRIPS = 20000 };

static _Alignas(64) _Atomic long turn;
static _Atomic int gave_up;

static int pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Wait until `turn` is `value`; 0 when a second passed first. */
static int wait_for(long value, double deadline)
{
    for (unsigned spins = 0;; spins++) {
        if (atomic_load_explicit(&turn, memory_order_acquire) == value)
            return 1;
        if (atomic_load_explicit(&gave_up, memory_order_relaxed))
            return 0;
        if (spins % 4096 == 0 && now() > deadline) {
            atomic_store(&gave_up, 1);
            return 0;
        }
    }
}

static void *answer(void *arg)
{
    double deadline = *(double *)arg;
    pin(1);
    for (long i = 0; i < ROUND_TRIPS; i++) {
        if (!wait_for(2 * i + 1, deadline))
            return NULL;
        atomic_store_explicit(&turn, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

int main(void)
{
    pthread_t other;
    double deadline = now() + 1.0;
    if (pin(0) != 0 || pthread_create(&other, NULL, answer, &deadline) != 0) {
        perror("line_round_trip");
        return 1;
    }
    double start = now();
    int done = 1;
    for (long i = 0; i < ROUND_TRIPS && done; i++) {
        atomic_store_explicit(&turn, 2 * i + 1, memory_order_release);
        done = wait_for(2 * i + 2, deadline);
    }
    double elapsed = now() - start;
    pthread_join(other, NULL);
    if (!done) {
        puts("busy");
        return 2;
    }
    printf("%.0f\n", elapsed * 1e9 / ROUND_TRIPS);
    return 0;
}
