"""The doors: each API this function speaks, over the one generation service.

A door parses its own request shape into a `GenerationRequest`, runs it through
`GenerationService`, and shapes the `Produced` result (or the error) as its clients expect.
imagegen.app gives each door's endpoints to the HTTP adapter (imagegen.http).
"""
