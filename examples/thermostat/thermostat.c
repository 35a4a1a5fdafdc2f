/* thermostat: reads the "temperature" capability on every tick and switches a heater.
 *
 * Publishes the reading on out/temperature each tick, and "on"/"off" on out/heater when the
 * heater changes (hysteresis of 0.5 degrees around the setpoint). A message on in/setpoint
 * with a number (e.g. "22.5") moves the setpoint.
 */
#include <stdio.h>
#include <stdlib.h>

#include "mesh.h"

static double setpoint = 21.0;
static int heater = -1; /* unknown until the first reading */
static char inbox[256];

MESH_EXPORT("mesh_alloc") void *alloc(int32_t size) {
    return size <= (int32_t)sizeof inbox ? inbox : NULL;
}

MESH_EXPORT("mesh_on_message")
void on_message(const char *topic, int32_t topic_len, const char *payload, int32_t len) {
    if (topic_len != 8 || memcmp(topic, "setpoint", 8) != 0) return;
    char text[32];
    if (len <= 0 || len >= (int32_t)sizeof text) return;
    memcpy(text, payload, (size_t)len);
    text[len] = 0;
    char *end;
    double value = strtod(text, &end);
    if (end == text) {
        mesh_log_str(MESH_WARN, "ignoring a setpoint that is not a number");
        return;
    }
    setpoint = value;
    printf("setpoint now %.1f\n", setpoint);
    fflush(stdout);
}

MESH_EXPORT("mesh_on_tick") void on_tick(int64_t now_ms) {
    (void)now_ms;
    char reading[32];
    int32_t n = mesh_read("temperature", 11, reading, sizeof reading - 1);
    if (n < 0) {
        mesh_log_str(MESH_ERROR, "no temperature sensor on this device");
        return;
    }
    reading[n] = 0;
    double t = strtod(reading, NULL);
    char out[32];
    snprintf(out, sizeof out, "%.1f", t);
    mesh_publish_str("temperature", out);
    int want = heater;
    if (t < setpoint - 0.5) want = 1;
    if (t > setpoint + 0.5) want = 0;
    if (heater < 0 && want < 0) want = t < setpoint;
    if (want != heater) {
        heater = want;
        mesh_publish_str("heater", heater ? "on" : "off");
    }
}
