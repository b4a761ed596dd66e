"""sendooway frontend: the SMTP side a mail client talks to, and the relay."""
