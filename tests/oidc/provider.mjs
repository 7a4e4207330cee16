// The OpenID Provider the tests sign people in with: npm oidc-provider (a
// certified implementation maintained by others), configured from one JSON
// file the harness writes (tests/oidc/harness.py), served over TLS on
// 127.0.0.1. It prints "listening PORT" once it accepts connections.
//
// The JSON file: {"cert": PEM, "key": PEM, "jwk": private signing JWK,
//   "clients": [client metadata], "users": {login: claims}, "id_token_ttl": s}
// Its built-in development login and consent pages stand in for the
// company's: any password works for a known login.
import { readFileSync } from 'node:fs';
import https from 'node:https';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const server = https.createServer({ cert: config.cert, key: config.key });

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const provider = new Provider(`https://127.0.0.1:${port}`, {
    clients: config.clients,
    jwks: { keys: [config.jwk] },
    features: {
      deviceFlow: { enabled: true },
      devInteractions: { enabled: true },
    },
    scopes: ['openid', 'profile', 'groups'],
    claims: { openid: ['sub'], profile: ['name', 'preferred_username', 'email'], groups: ['groups'] },
    // The groups claim in the ID token itself, as Keycloak or Entra ID put it.
    conformIdTokenClaims: false,
    ttl: { IdToken: config.id_token_ttl || 3600 },
    async findAccount(ctx, id) {
      const claims = config.users[id];
      if (!claims) return undefined;
      return { accountId: id, async claims() { return { sub: id, ...claims }; } };
    },
  });
  server.on('request', provider.callback());
  process.stdout.write(`listening ${port}\n`);
});
