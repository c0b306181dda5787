/* A layer gate: the model marks layer i once it has *queued* that layer's work and recorded the
 * layer's event; a transfer worker waits for the mark (a short host wait for the launch, not for
 * the computation) before it makes its stream wait on the event. */
#ifndef LLMDIST_LAYER_GATE_H
#define LLMDIST_LAYER_GATE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct llmd_gate llmd_gate;

enum { LLMD_GATE_OK = 0, LLMD_GATE_TIMEOUT = 1, LLMD_GATE_STOPPED = 2 };

llmd_gate *llmd_gate_create(int32_t num_layers);
void llmd_gate_destroy(llmd_gate *g);
/* Mark layer as recorded (out-of-range layers are ignored by the caller's check). */
void llmd_gate_mark(llmd_gate *g, int32_t layer);
/* Forget every mark, for the next forward pass. */
void llmd_gate_reset(llmd_gate *g);
/* Wait until layer is marked: LLMD_GATE_OK, LLMD_GATE_TIMEOUT once timeout_ms (>= 0) passed, or
 * LLMD_GATE_STOPPED as soon as *stop becomes nonzero (checked every few milliseconds). */
int llmd_gate_wait(llmd_gate *g, int32_t layer, int32_t timeout_ms, const volatile int *stop);

#ifdef __cplusplus
}
#endif
#endif
