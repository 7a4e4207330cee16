"""People sign in through OpenID Connect; roles decide what each may do on the management API."""
