"""Chunked exact search against a full sort of the whole score matrix."""

import pytest
import torch

from advbct.evaluation import exact_search


@pytest.mark.parametrize(("query_chunk", "gallery_chunk"), [(7, 13), (1000, 5), (3, 1000)])
def test_exact_search_equals_a_full_sort(query_chunk, gallery_chunk):
    gen = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(23, 16, generator=gen), torch.randn(101, 16, generator=gen)
    full = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
    expected_scores, expected_indices = torch.sort(full, dim=1, descending=True)
    for k in (1, 10, 101):
        scores, indices = exact_search(queries, gallery, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
        assert torch.equal(indices, expected_indices[:, :k])
        assert torch.allclose(scores, expected_scores[:, :k], atol=1e-6)


def test_equal_scores_are_ordered_by_gallery_index():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
    _, indices = exact_search(torch.tensor([[1.0, 0.0]]), gallery, 4, gallery_chunk=2)
    assert indices.tolist() == [[0, 2, 3, 1]]


def test_exact_search_refuses_mismatched_input():
    with pytest.raises(ValueError, match="dim"):
        exact_search(torch.randn(2, 4), torch.randn(5, 3), 1)
    with pytest.raises(ValueError, match="gallery size"):
        exact_search(torch.randn(2, 4), torch.randn(5, 4), 6)
    with pytest.raises(ValueError, match="2-D"):
        exact_search(torch.randn(4), torch.randn(5, 4), 1)
