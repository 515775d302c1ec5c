"""Token-by-token float64 SSD recurrence (FACTS.md §3): the independent reference every SSD implementation is tested
against. Plain numpy, written from the definition, shared by the SSD and kernel tests."""

import numpy as np


def ssd_recurrence(x, dt, A, B, C, D=None, initial_state=None, segment_ids=None):
    """y[b,t,h] = S_t @ C_t + D*x_t with S_t = exp(dt_t*A) S_{t-1} + dt_t outer(x_t, B_t), reset on a segment change.

    x [b,l,h,p], dt [b,l,h] (already bias-added/softplus'd/clamped), A [h], B/C [b,l,g,n], D [h],
    initial_state [b,h,p,n], segment_ids [b,l]. Returns (y [b,l,h,p], final_state [b,h,p,n]) in float64.
    """
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    heads_per_group = h // g
    S = np.zeros((b, h, p, n)) if initial_state is None else np.array(initial_state, np.float64)
    y = np.zeros_like(x)
    for t in range(l):
        if segment_ids is not None and t > 0:
            reset = np.asarray(segment_ids)[:, t] != np.asarray(segment_ids)[:, t - 1]
            S[reset] = 0.0
        Bh = np.repeat(B[:, t], heads_per_group, axis=1)  # [b,h,n]
        Ch = np.repeat(C[:, t], heads_per_group, axis=1)
        decay = np.exp(dt[:, t] * A)  # [b,h]
        S = decay[:, :, None, None] * S + dt[:, t][:, :, None, None] * x[:, t][:, :, :, None] * Bh[:, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", S, Ch)
        if D is not None:
            y[:, t] += np.asarray(D, np.float64)[None, :, None] * x[:, t]
    return y, S
