"""The measurement library under `sazd bench ...`, `sazd experiment ...` and `sazd design`.

One of each: naming a code on the command line and timing its operations (:mod:`.codes`), checking
list flags (:mod:`.flags`), the worst decode error over straggler sets (:mod:`.decode`), the machine
the figures came from (:mod:`.machine`), the table printer (:mod:`.table`), figures without a display
(:mod:`.figures`), the timing loop (:mod:`.timing`), measuring training iterations with their traffic
against the model's own formula (:mod:`.training`) and a bounded Ray session (:mod:`.ray_session`).

The commands build their parsers from modules that ``sazd --help`` imports, so :mod:`.codes`,
:mod:`.flags`, :mod:`.decode`, :mod:`.machine`, :mod:`.table`, :mod:`.figures` and :mod:`.timing`
import torch, matplotlib and sazd's torch modules only inside the functions that need them;
:mod:`.training` and :mod:`.ray_session` import theirs at the top and are imported by the commands
when they run.
"""
