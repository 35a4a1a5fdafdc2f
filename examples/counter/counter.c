/* counter: keeps its whole state on the heap.
 *
 * Every message on .../in is counted and hashed; the last eight payloads are kept in a
 * malloc'd list. After each message it publishes "<count> <hash> <kept>" on out/count.
 * The payload "reset" clears everything. State lives only in linear memory (the heap and
 * one static pointer), so a snapshot must carry memory faithfully for this app to resume.
 */
#include <stdio.h>
#include <stdlib.h>

#include "mesh.h"

#define KEEP 8

typedef struct entry {
    struct entry *next;
    int32_t len;
    char data[];
} entry;

typedef struct {
    uint64_t count;
    uint64_t hash;
    entry *recent; /* newest first */
    int kept;
} state;

static state *st;

MESH_EXPORT("mesh_alloc") void *alloc(int32_t size) { return malloc((size_t)size); }

MESH_EXPORT("mesh_free") void release(void *ptr) { free(ptr); }

MESH_EXPORT("mesh_init") void init(void) {
    st = calloc(1, sizeof *st);
    st->hash = 1469598103934665603ULL;
    mesh_log_str(MESH_INFO, "counter ready");
}

static void forget_all(void) {
    while (st->recent) {
        entry *next = st->recent->next;
        free(st->recent);
        st->recent = next;
    }
    st->kept = 0;
}

static void keep(const char *payload, int32_t len) {
    entry *e = malloc(sizeof *e + (size_t)len);
    e->len = len;
    memcpy(e->data, payload, (size_t)len);
    e->next = st->recent;
    st->recent = e;
    if (++st->kept > KEEP) { /* drop the oldest */
        entry *p = st->recent;
        while (p->next->next) p = p->next;
        free(p->next);
        p->next = NULL;
        st->kept--;
    }
}

MESH_EXPORT("mesh_on_message")
void on_message(const char *topic, int32_t topic_len, const char *payload, int32_t len) {
    (void)topic;
    (void)topic_len;
    if (len == 5 && memcmp(payload, "reset", 5) == 0) {
        forget_all();
        st->count = 0;
        st->hash = 1469598103934665603ULL;
    } else {
        st->count++;
        for (int32_t i = 0; i < len; i++) st->hash = (st->hash ^ (uint8_t)payload[i]) * 1099511628211ULL;
        keep(payload, len);
    }
    int32_t bytes = 0;
    for (entry *e = st->recent; e; e = e->next) bytes += e->len;
    char out[96];
    snprintf(out, sizeof out, "%llu %016llx %d %d", (unsigned long long)st->count,
             (unsigned long long)st->hash, st->kept, bytes);
    mesh_publish_str("count", out);
}
