"""The KV page pool's host side: which pages are free, who holds each, and how many.

The device cache is a pool of fixed-size pages per dp replica; a sequence holds a list of page
ids (its block table) covering its positions. Page 0 of each replica is never handed out: idle
rows, padding rows and table entries past a sequence's length point at it, so their writes land
where nothing reads. Reference counts are kept per page so pages can later be shared between
sequences (prefix caching); today each page has one holder.
"""
from __future__ import annotations

import collections

from jaxtp.ops.paged import SCRATCH_PAGE


class BlockManager:
    """`pages` pages of `page_size` tokens in each of `replicas` pools (page 0 is scratch)."""

    def __init__(self, pages: int, page_size: int, replicas: int = 1):
        if pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages per replica, got {pages}")
        self.pages, self.page_size, self.replicas = pages, page_size, replicas
        self._free = [collections.deque(p for p in range(pages) if p != SCRATCH_PAGE) for _ in range(replicas)]
        self._refs = [[0] * pages for _ in range(replicas)]

    @property
    def capacity(self) -> int:
        """Pages a single replica can hand out (all but the scratch page)."""
        return self.pages - 1

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def free_pages(self, replica: int) -> int:
        return len(self._free[replica])

    def used_pages(self, replica: int) -> int:
        return self.capacity - self.free_pages(replica)

    def usage(self) -> float:
        """Share of the fullest replica's pages in use."""
        return max(self.used_pages(r) for r in range(self.replicas)) / self.capacity

    def needed(self, held: list[int], tokens: int) -> int:
        """Pages to add to `held` so that it covers `tokens` positions."""
        return max(0, self.pages_for(tokens) - len(held))

    def grow(self, held: list[int], replica: int, tokens: int) -> bool:
        """Extend `held` to cover `tokens` positions; False (and nothing taken) if the replica
        has too few free pages."""
        n = self.needed(held, tokens)
        free = self._free[replica]
        if n > len(free):
            return False
        for _ in range(n):
            page = free.popleft()
            self._refs[replica][page] = 1
            held.append(page)
        return True

    def release(self, held: list[int], replica: int) -> None:
        """Drop one reference to each of `held`'s pages; a page nobody holds is free again."""
        refs = self._refs[replica]
        for page in held:
            refs[page] -= 1
            if refs[page] == 0:
                self._free[replica].append(page)
        held.clear()
