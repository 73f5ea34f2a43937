"""The Sendmail milter protocol (version 6): a sans-IO codec for both directions
(:mod:`smtpgate.milter.codec`) and smtpgate's asyncio milter client
(:mod:`smtpgate.milter.client`), used by the ``milter`` plugin (docs/filters/milter.md)."""
