/* The liquid-mesh app ABI for C (see DESIGN.md, "App ABI").
 *
 * Build an app as a WASI reactor:
 *   clang --target=wasm32-wasi -mexec-model=reactor -O2 -Iinclude -o app.wasm app.c
 */
#ifndef LIQUID_MESH_H
#define LIQUID_MESH_H

#include <stdint.h>
#include <string.h>

/* Return codes of the mesh imports. */
#define MESH_E_INVALID   (-1) /* bad argument, e.g. a topic with '+', '#' or NUL */
#define MESH_E_TOO_LARGE (-2) /* payload or topic too long, buffer too small, too many publishes */
#define MESH_E_UNKNOWN   (-3) /* no such capability on this device */
#define MESH_E_FAULT     (-4) /* pointer outside linear memory */
#define MESH_E_FAILED    (-5) /* the host could not do it */

#define MESH_DEBUG 0
#define MESH_INFO  1
#define MESH_WARN  2
#define MESH_ERROR 3

#define MESH_IMPORT(name) __attribute__((import_module("mesh"), import_name(name)))
#define MESH_EXPORT(name) __attribute__((export_name(name)))

/* Publishes on <root>/apps/<app>/out/<topic>. 0 on success, a MESH_E_* code on error. */
MESH_IMPORT("publish") int32_t mesh_publish(const char *topic, int32_t topic_len,
                                            const void *payload, int32_t payload_len);
/* Logs one line at a MESH_* level. */
MESH_IMPORT("log") void mesh_log(int32_t level, const char *text, int32_t len);
/* Wall clock, milliseconds since the Unix epoch. */
MESH_IMPORT("now_ms") int64_t mesh_now_ms(void);
/* Reads a device capability such as "temperature": bytes written, or a MESH_E_* code. */
MESH_IMPORT("read") int32_t mesh_read(const char *name, int32_t name_len, void *out,
                                      int32_t out_cap);

static inline int32_t mesh_publish_str(const char *topic, const char *text) {
    return mesh_publish(topic, (int32_t)strlen(topic), text, (int32_t)strlen(text));
}

static inline void mesh_log_str(int32_t level, const char *text) {
    mesh_log(level, text, (int32_t)strlen(text));
}

#endif
