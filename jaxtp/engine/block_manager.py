"""The KV page pool's host side: which pages are free, who holds each, how many hold it, and
which full pages hold a known prefix (automatic prefix caching).

The device cache is a pool of fixed-size pages per dp replica; a sequence holds a list of page
ids (its block table) covering its positions. Page 0 of each replica is never handed out: idle
rows, padding rows and table entries past a sequence's length point at it, so their writes land
where nothing reads.

A full page is known by a chained hash of the page before it and its own token ids (a page's
keys and values depend on exactly those). `match` hands out the longest known prefix of a
prompt, shared (its reference counts go up); a freed page keeps its hash and is evicted, least
recently freed first, only when `grow` needs it. A hash hit is confirmed against the page's
tokens and its parent page (and that page's reuse count), so a collision never returns wrong KV.
"""
from __future__ import annotations

from jaxtp.ops.paged import SCRATCH_PAGE


def page_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """A full page's key: its parent page's key and its own token ids (Python's tuple hash is
    stable across runs for ints; matches are confirmed against the tokens anyway)."""
    return hash((parent, tokens))


class BlockManager:
    """`pages` pages of `page_size` tokens in each of `replicas` pools (page 0 is scratch);
    `caching` turns prefix caching on."""

    def __init__(self, pages: int, page_size: int, replicas: int = 1, caching: bool = False):
        if pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages per replica, got {pages}")
        self.pages, self.page_size, self.replicas, self.caching = pages, page_size, replicas, caching
        # free pages in eviction order (dicts keep insertion order: the first is evicted first)
        self._free = [dict.fromkeys(p for p in range(pages) if p != SCRATCH_PAGE) for _ in range(replicas)]
        self._refs = [[0] * pages for _ in range(replicas)]
        self._uses = [[0] * pages for _ in range(replicas)]      # times each page was handed out anew
        self._key: list[list[tuple | None]] = [[None] * pages for _ in range(replicas)]  # (hash, parent, tokens)
        self._known: list[dict[int, int]] = [{} for _ in range(replicas)]  # hash -> page

    @property
    def capacity(self) -> int:
        """Pages a single replica can hand out (all but the scratch page)."""
        return self.pages - 1

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def free_pages(self, replica: int) -> int:
        """Pages nobody holds (cached ones included: they are evicted when needed)."""
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
            page = next(iter(free))
            del free[page]
            self._forget(replica, page)
            self._uses[replica][page] += 1
            self._refs[replica][page] = 1
            held.append(page)
        return True

    def release(self, held: list[int], replica: int) -> None:
        """Drop one reference to each of `held`'s pages; a page nobody holds is free again (its
        last pages first in line for eviction, so a shared prefix outlives its tails)."""
        refs = self._refs[replica]
        for page in reversed(held):
            refs[page] -= 1
            if refs[page] == 0:
                self._free[replica][page] = None
        held.clear()

    def _chain(self, tokens: list[int]):
        """(hash, tokens) of each full page of `tokens`, in order."""
        size, h = self.page_size, None
        for i in range(len(tokens) // size):
            page_tokens = tuple(tokens[i * size:(i + 1) * size])
            h = page_hash(h, page_tokens)
            yield h, page_tokens

    def known_prefix(self, replica: int, tokens: list[int]) -> list[int]:
        """The pages holding the longest known prefix of `tokens` in `replica` (full pages,
        leaving at least one token to compute); nothing is taken."""
        if not self.caching:
            return []
        found, parent = [], None
        for h, page_tokens in self._chain(tokens[:len(tokens) - 1]):
            page = self._known[replica].get(h)
            if page is None or self._key[replica][page] != (h, parent, page_tokens):
                break
            found.append(page)
            parent = (page, self._uses[replica][page])
        return found

    def take(self, replica: int, pages: list[int]) -> list[int]:
        """Hold `pages` (a known prefix) as well: their references go up, none is evicted."""
        for page in pages:
            self._refs[replica][page] += 1
            self._free[replica].pop(page, None)
        return pages

    def match(self, replica: int, tokens: list[int]) -> list[int]:
        """known_prefix, taken: the caller holds its pages like grown ones."""
        return self.take(replica, self.known_prefix(replica, tokens))

    def publish(self, held: list[int], replica: int, tokens: list[int]) -> None:
        """Make `held`'s full pages of `tokens` (positions whose keys and values are written, or
        queued to be) known to later `match`es."""
        if not self.caching:
            return
        parent = None
        for page, (h, page_tokens) in zip(held, self._chain(tokens)):
            key = (h, parent, page_tokens)
            if self._key[replica][page] != key:
                self._forget(replica, self._known[replica].get(h))  # the newest copy is the one found
                self._forget(replica, page)
                self._key[replica][page], self._known[replica][h] = key, page
            parent = (page, self._uses[replica][page])

    def _forget(self, replica: int, page: int | None) -> None:
        key = None if page is None else self._key[replica][page]
        if key is not None:
            self._key[replica][page] = None
            if self._known[replica].get(key[0]) == page:
                del self._known[replica][key[0]]
