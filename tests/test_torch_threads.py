"""Overlapping one-thread sections (an analysis and a preview at once) restore torch's thread count."""

import torch

from mergescope.checkpoints.device import one_torch_thread


def test_overlapping_sections_restore_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one_torch_thread.enter()  # the analysis starts
        one_torch_thread.enter()  # a preview starts while it runs
        assert torch.get_num_threads() == 1
        one_torch_thread.exit()  # the analysis ends first
        assert torch.get_num_threads() == 1  # the preview still runs one-threaded
        one_torch_thread.exit()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
