"""The published similarity computation, one caption at a time: the reference that the batched
:class:`~vsl.models.similarity.SimilarityEncoder` is tested against, and the baseline the
benchmarks time. It follows the published sequence of operations (separate query and key
projections, a full softmax, transposed copies), not our exact rewrites of it; no program uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .encoders import l1norm, l2norm
from .similarity import ATTENTION_SMOOTH, AttentionFiltration, GraphReasoning, SimilarityEncoder


def published_scan_attention(query: torch.Tensor, context: torch.Tensor,
                             smooth: float = ATTENTION_SMOOTH) -> torch.Tensor:
    """SCAN text-to-image attention for one caption: ``query (n, L, d)`` (the caption repeated for
    ``n`` images), ``context (n, R, d)`` -> ``(n, L, d)`` l2-normalised visual contexts."""
    attn = F.leaky_relu(torch.bmm(context, query.transpose(1, 2)), 0.1)     # (n, R, L)
    attn = l2norm(attn, dim=2)
    attn = F.softmax(attn.transpose(1, 2).contiguous() * smooth, dim=2)    # (n, L, R)
    weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous())  # (n, d, L)
    return l2norm(weighted.transpose(1, 2), dim=-1)


def published_reasoning_step(step: GraphReasoning, nodes: torch.Tensor) -> torch.Tensor:
    """One SGR step with separate query and key projections: ``(P, N, s)`` -> ``(P, N, s)``."""
    edges = torch.softmax(step.graph_query_w(nodes) @ step.graph_key_w(nodes).transpose(1, 2), dim=-1)
    return F.relu(step.sim_graph_w(edges @ nodes))


def published_filtration(saf: AttentionFiltration, nodes: torch.Tensor) -> torch.Tensor:
    """SAF for one caption (all nodes valid; BatchNorm over its ``P`` images): ``(P, N, s)`` -> ``(P, s)``."""
    attn = torch.sigmoid(saf.bn(saf.attn_sim_w(nodes).transpose(1, 2)))
    pooled = l1norm(attn, dim=-1) @ nodes
    return l2norm(pooled.squeeze(1), dim=-1)


def published_similarity(sim_enc: SimilarityEncoder, img_emb: torch.Tensor, cap_emb: torch.Tensor,
                         lengths: torch.Tensor) -> torch.Tensor:
    """The published loop over captions: ``img_emb (n, R, d)``, ``cap_emb (m, L, d)``, ``lengths (m,)`` -> ``(n, m)``."""
    n = img_emb.size(0)
    img_glo = sim_enc.v_global_w(img_emb)
    out = []
    for j in range(cap_emb.size(0)):
        words = cap_emb[j, : int(lengths[j])].unsqueeze(0)                     # (1, L, d)
        cap_glo = sim_enc.t_global_w(words, torch.ones(1, words.size(1), dtype=torch.bool, device=words.device))
        words = words.expand(n, -1, -1)                                        # (n, L, d)
        context = published_scan_attention(words, img_emb)
        sim_loc = l2norm(sim_enc.sim_tranloc_w((context - words) ** 2), dim=-1)
        sim_glo = l2norm(sim_enc.sim_tranglo_w((img_glo - cap_glo) ** 2), dim=-1)
        nodes = torch.cat([sim_glo.unsqueeze(1), sim_loc], dim=1)
        if sim_enc.module_name == "SGR":
            for step in sim_enc.SGR_module:
                nodes = published_reasoning_step(step, nodes)
            vec = nodes[:, 0]
        else:
            vec = published_filtration(sim_enc.SAF_module, nodes)
        out.append(torch.sigmoid(sim_enc.sim_eval_w(vec)))
    return torch.cat(out, dim=1)
