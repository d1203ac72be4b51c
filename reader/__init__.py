"""The BTR reader: split encoders over binary token representations (see README)."""
