// Starts Swagger UI on this service's own document. Nothing is fetched from elsewhere:
// validatorUrl's default would send the document to validator.swagger.io for a badge.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  layout: "BaseLayout",
});
