package alliance.validator;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.net.Proxy;
import java.net.ProxySelector;
import java.net.SocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.stream.Stream;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import org.hl7.fhir.instance.model.api.IBaseResource;

/**
 * Validates FHIR R4 (4.0.1) resources with HAPI FHIR's instance validator, offline.
 *
 * <p>Usage: {@code Main [--profiles DIR]... [FILE|DIR|-]...}. A file holds one resource (JSON);
 * a directory stands for its {@code *.json} files; {@code -} reads standard input: a JSON array
 * of resources, or one resource per line (NDJSON). {@code --profiles DIR} loads the
 * StructureDefinitions, ValueSets and CodeSystems (JSON) in DIR before validating.
 *
 * <p>Prints one JSON object per resource on standard output, in input order: {@code {"index",
 * "source", "resourceType", "id", "issues": [{"severity", "location", "line", "column",
 * "messageId", "message"}]}}, then a last line {@code {"summary": {"resources", "errors",
 * "warnings", "networkAttempts"}}}. No terminology server is configured; every attempt to open
 * a network connection is refused and counted in {@code networkAttempts}. NDJSON on standard
 * input is validated line by line as it arrives (each result flushed at once), so one JVM can
 * serve a whole test session. Exit status: 0 when it ran (whatever it found), 2 on bad usage
 * or unreadable input.
 */
public final class Main {
  private static final AtomicInteger NETWORK_ATTEMPTS = new AtomicInteger();

  private Main() {}

  /** A proxy selector that refuses every connection and counts the attempts. */
  private static final class NoNetwork extends ProxySelector {
    @Override
    public List<Proxy> select(URI uri) {
      NETWORK_ATTEMPTS.incrementAndGet();
      // The discard port on loopback: nothing listens, the connection is refused at once.
      return List.of(new Proxy(Proxy.Type.HTTP, new InetSocketAddress("127.0.0.1", 9)));
    }

    @Override
    public void connectFailed(URI uri, SocketAddress sa, IOException ioe) {}
  }

  public static void main(String[] args) throws Exception {
    ProxySelector.setDefault(new NoNetwork());
    ObjectMapper mapper = new ObjectMapper();
    List<Path> profileDirs = new ArrayList<>();
    List<String> sources = new ArrayList<>();
    for (int i = 0; i < args.length; i++) {
      if (args[i].equals("--profiles")) {
        if (i + 1 >= args.length) {
          usage("--profiles needs a directory");
        }
        profileDirs.add(Path.of(args[++i]));
      } else {
        sources.add(args[i]);
      }
    }

    FhirContext ctx = FhirContext.forR4Cached();
    PrePopulatedValidationSupport local = new PrePopulatedValidationSupport(ctx);
    for (Path dir : profileDirs) {
      for (Path file : jsonFiles(dir)) {
        IBaseResource res = ctx.newJsonParser().parseResource(Files.readString(file));
        local.addResource(res);
      }
    }
    ValidationSupportChain chain =
        new ValidationSupportChain(
            new DefaultProfileValidationSupport(ctx),
            local,
            new CommonCodeSystemsTerminologyService(ctx),
            new InMemoryTerminologyServerValidationSupport(ctx),
            new SnapshotGeneratingValidationSupport(ctx));
    FhirInstanceValidator module = new FhirInstanceValidator(chain);
    // An extension without a StructureDefinition is an error, not a pass.
    module.setAnyExtensionsAllowed(false);
    Run run = new Run(mapper, ctx.newValidator().registerValidatorModule(module));

    try {
      for (String source : sources) {
        if (source.equals("-")) {
          readStdin(mapper, run);
        } else {
          readPath(Path.of(source), run);
        }
      }
    } catch (IOException e) {
      System.err.println("fhir-validator: cannot read input: " + e.getMessage());
      System.exit(2);
    }
    ObjectNode summary = mapper.createObjectNode();
    ObjectNode body = summary.putObject("summary");
    body.put("resources", run.index);
    body.put("errors", run.errors);
    body.put("warnings", run.warnings);
    body.put("networkAttempts", NETWORK_ATTEMPTS.get());
    run.out.println(mapper.writeValueAsString(summary));
  }

  /** Validates resources one at a time and prints each result as soon as it is known. */
  private static final class Run {
    final ObjectMapper mapper;
    final FhirValidator validator;
    final PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
    int index;
    int errors;
    int warnings;

    Run(ObjectMapper mapper, FhirValidator validator) {
      this.mapper = mapper;
      this.validator = validator;
    }

    void validate(String source, String json) throws IOException {
      ObjectNode line = mapper.createObjectNode();
      line.put("index", index++);
      line.put("source", source);
      ArrayNode issues = line.putArray("issues");
      try {
        JsonNode tree = mapper.readTree(json);
        line.put("resourceType", tree.path("resourceType").asText(""));
        line.put("id", tree.path("id").asText(""));
        ValidationResult result = validator.validateWithResult(json);
        for (SingleValidationMessage m : result.getMessages()) {
          ObjectNode issue = issues.addObject();
          String severity = m.getSeverity().getCode();
          issue.put("severity", severity);
          issue.put("location", m.getLocationString());
          if (m.getLocationLine() != null) {
            issue.put("line", m.getLocationLine());
          }
          if (m.getLocationCol() != null) {
            issue.put("column", m.getLocationCol());
          }
          issue.put("messageId", m.getMessageId());
          issue.put("message", m.getMessage());
          if (severity.equals("error") || severity.equals("fatal")) {
            errors++;
          } else if (severity.equals("warning")) {
            warnings++;
          }
        }
      } catch (Exception e) {
        // Unparseable input is a finding about that resource, not a crash of the run.
        ObjectNode issue = issues.addObject();
        issue.put("severity", "fatal");
        issue.put("location", "");
        issue.put("messageId", "UNPARSEABLE");
        issue.put("message", String.valueOf(e.getMessage()));
        errors++;
      }
      out.println(mapper.writeValueAsString(line));
    }
  }

  private static void usage(String problem) {
    System.err.println("fhir-validator: " + problem);
    System.err.println("usage: Main [--profiles DIR]... [FILE|DIR|-]...");
    System.exit(2);
  }

  private static List<Path> jsonFiles(Path dir) throws IOException {
    try (Stream<Path> files = Files.list(dir)) {
      return files.filter(p -> p.toString().endsWith(".json")).sorted().toList();
    }
  }

  private static void readPath(Path path, Run run) throws IOException {
    if (Files.isDirectory(path)) {
      for (Path file : jsonFiles(path)) {
        run.validate(file.toString(), Files.readString(file));
      }
    } else {
      run.validate(path.toString(), Files.readString(path));
    }
  }

  /** A JSON array (read whole), or NDJSON validated line by line as it arrives. */
  private static void readStdin(ObjectMapper mapper, Run run) throws IOException {
    BufferedReader in =
        new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    in.mark(1 << 16);
    int first;
    do {
      first = in.read();
    } while (first != -1 && Character.isWhitespace(first));
    in.reset();
    int i = 0;
    if (first == '[') {
      JsonNode array = mapper.readTree(in);
      for (JsonNode node : array) {
        run.validate("stdin[" + i++ + "]", mapper.writeValueAsString(node));
      }
      return;
    }
    String line;
    while ((line = in.readLine()) != null) {
      if (!line.isBlank()) {
        run.validate("stdin[" + i++ + "]", line);
      }
    }
  }
}
