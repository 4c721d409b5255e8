"""The project's Triton kernels (each module imports ``triton``, so each is imported lazily, at
its first use, by the code that launches it).

| module | kernels | used by |
|---|---|---|
| ``gather_kernels`` | LSE merge of a call's pieces, gradient sums | the strided sub-problem backend |
| ``merge_kernel`` | the online LSE merge into float32 accumulators; ``lse_weights`` | [`dilated.kernels.merge`][dilated.kernels.merge], the fused epilogues |
| ``accumulate_kernel`` | strided gradient adds, overlapping key windows | [`dilated.kernels.accumulate`][dilated.kernels.accumulate] |
| ``fused_attention`` | the fused dilated attention, forward and backward | the ``"triton"`` backend |
| ``block_rows_kernel`` | many short dense pieces in one launch | [`dilated.kernels.block_rows`][dilated.kernels.block_rows] |

None of them is a dense engine: those are in [`dilated.kernels.engines`][dilated.kernels.engines].
"""
