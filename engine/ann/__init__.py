"""The approximate top-k index beside a store: FAISS IVF over the raw stored rows (and their unit-normalised
copies for Grad-Cos), built resumably by `tributary ann build STORE`, fingerprinted to the store it indexes.

Every single-term method scores ⟨transformed query, raw stored row⟩, so one inner-product index serves
Grad-Dot, IF and one-segment Source, and its normalised variant serves Grad-Cos.
"""
